#!/usr/bin/env bash
# `make test` hook: a fixture run of the text-only round trip. Builds the small repository of
# scripts/ctx_fixture_repo.py (renames, a copy, files without a final newline, last lines
# deleted), crawls and reconstructs it with the davinci binary, then rebuilds every emitted sample
# from its text alone with scripts/check_ctx_roundtrip.py and compares it with git at head_sha.
# DAVINCI overrides the binary (default: `cargo run -q -p davinci-cli --`).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in git python3; do
  if ! command -v "$tool" >/dev/null; then echo "SKIP ctx round-trip fixture run: no $tool on PATH"; exit 0; fi
done
if ! python3 -c 'import zstandard' 2>/dev/null && ! command -v zstd >/dev/null; then
  echo "SKIP ctx round-trip fixture run: neither the zstd tool nor python3's zstandard module (apt-get install zstd)"
  exit 0
fi
read -r -a davinci <<< "${DAVINCI:-${CARGO:-cargo} run -q -p davinci-cli --}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 scripts/ctx_fixture_repo.py "$tmp/repo"
"${davinci[@]}" crawl --repo "$tmp/repo" --repo-name acme/lrucache --out "$tmp/out" >"$tmp/crawl.log" 2>&1 \
  || { cat "$tmp/crawl.log"; exit 1; }
"${davinci[@]}" reconstruct --in "$tmp/out/runs/crawl/prs" --out "$tmp/out/recon" >"$tmp/recon.log" 2>&1 \
  || { cat "$tmp/recon.log"; exit 1; }
out=$(python3 scripts/check_ctx_roundtrip.py --git "$tmp/repo/.git" "$tmp/out/recon/samples") \
  || { echo "$out"; cat "$tmp/recon.log"; exit 1; }
echo "$out"
# Every fixture PR must have been emitted in both formats: an empty or partial run proves nothing.
for fmt in ctx-general ctx-python; do
  grep -q "^$fmt: 3 emitted, 3 rebuilt OK, 0 failed$" <<< "$out" \
    || { echo "ctx round-trip fixture run: expected 3 $fmt samples rebuilt"; cat "$tmp/recon.log"; exit 1; }
done
