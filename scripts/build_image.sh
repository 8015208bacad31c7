#!/usr/bin/env bash
# Builds the davinci image (deploy/Dockerfile) from a davinci binary built on this host, on a
# base assembled from the host's Debian packages (scripts/build_sandbox_image.sh's recipe), so
# no image is pulled and nothing is compiled inside.
#
#   scripts/build_image.sh [BINARY] [TAG]    default target/release/davinci, davinci:dev
#   scripts/build_image.sh --base            only the base (cached by tag); prints its tag
#
# Prints the tag. Needs dpkg (a Debian or Ubuntu host) and a Docker Engine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/release/davinci}
tag=${2:-davinci:dev}
[ "$bin" = --base ] || [ -x "$bin" ] || { echo "no davinci binary at $bin: run \`cargo build --release\` first" >&2; exit 2; }

# What the targets run: git for clones, bubblewrap/util-linux for the evaluator's sandbox,
# python3 for test suites, ca-certificates for TLS to GitHub, S3 and LLM endpoints.
base=$(env -u DAVINCI_SANDBOX_IMAGE DAVINCI_BASE_NAME=davinci-runtime-base \
  DAVINCI_BASE_ROOTS="bash dash coreutils ca-certificates git bubblewrap util-linux python3 procps libc6 libgcc-s1" \
  "$here/scripts/build_sandbox_image.sh")
if [ "$bin" = --base ]; then
  echo "$base"
  exit 0
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/davinci"
docker build -q -f "$here/deploy/Dockerfile" --build-arg "BASE=$base" -t "$tag" "$ctx" >/dev/null
echo "$tag"
