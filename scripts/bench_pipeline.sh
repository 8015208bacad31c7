#!/usr/bin/env bash
# End-to-end pipeline benchmark: the quickstart spec on one repository, embedded
# (`davinci run`), distributed (`davinci serve --target all` on Redis + `davinci runs submit`),
# and distributed with a second replica of every stage, on the same machine, in one run.
# Usage: scripts/bench_pipeline.sh <repo path> [tokenizer.json]
set -euo pipefail
repo=${1:?usage: $0 <repo path> [tokenizer.json]}
tok=${2:-$(pwd)/crates/tokenize/tests/fixtures/tiny-qwen-shape.json}
bin=${DAVINCI_BIN:-${CARGO_TARGET_DIR:-target}/release/davinci}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== embedded"
/usr/bin/time -f "wall %e s, max RSS %M KiB" "$bin" run deploy/examples/quickstart.yaml \
  --repo "$repo" --tokenizer "$tok" --storage "file://$work/embedded" --run-id bench

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port)
redis-server --port "$rport" --save "" --appendonly no --daemonize no >/dev/null &
until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.1; done

# distributed <name> <replicas>: `serve --target all`, plus replicas-1 extra stage replicas.
distributed() {
  local name=$1 replicas=$2 port pids=()
  redis-cli -p "$rport" flushall >/dev/null
  port=$(free_port)
  DAVINCI__QUEUE__URL=redis://127.0.0.1:$rport DAVINCI__STORAGE__URI=file://$work/server-$name \
    "$bin" serve --target all --listen 127.0.0.1:$port --metrics-listen "" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 2 "$replicas"); do
    DAVINCI__QUEUE__URL=redis://127.0.0.1:$rport DAVINCI__STORAGE__URI=file://$work/server-$name \
      "$bin" serve --target crawler,reconstructor,tokenizer-packer --listen 127.0.0.1:$(free_port) \
      --metrics-listen "" 2>/dev/null &
    pids+=($!)
  done
  until "$bin" health --addr 127.0.0.1:$port >/dev/null 2>&1; do sleep 0.2; done
  sed -e "s#^sources:#run_id: bench\nstorage: file://$work/$name\nsources:#" \
      -e "s#- https://github.com/tkem/cachetools#- $repo#" -e "s#^tokenizer: .*#tokenizer: $tok#" \
      deploy/examples/quickstart.yaml > "$work/$name.yaml"
  /usr/bin/time -f "wall %e s" -o "$work/time" "$bin" runs submit --watch --addr 127.0.0.1:$port "$work/$name.yaml" 2>/dev/null
  cat "$work/time"
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  if diff -r "$work/embedded/runs/bench/samples" "$work/$name/runs/bench/samples" >/dev/null \
     && diff -r "$work/embedded/runs/bench/packed" "$work/$name/runs/bench/packed" -x manifest.json >/dev/null; then
    echo "samples and packed shards: identical to embedded"
  else
    echo "samples or packed shards DIFFER from embedded"; exit 1
  fi
}

echo "== distributed (one machine: redis-server + davinci serve --target all)"
distributed distributed 1
echo "== distributed, two replicas of each stage (+ serve --target crawler,reconstructor,tokenizer-packer)"
distributed replicas 2
