#!/bin/bash
# Runs scripts/check_megatron_args.py (Megatron-LM's own argument parser over the arguments the
# trainer renders for Qwen2.5-0.5B, 32B and 72B) in a virtualenv with megatron-core 0.15.3.
#   MEGATRON_LM=/path/to/Megatron-LM (a checkout at tag core_v0.15.3: the pip package has no
#   megatron/training)   VENV=/var/tmp/venv-megatron (created when absent; torch is ~2.8 GB)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/var/tmp/venv-megatron}
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at tag core_v0.15.3}"
[ -f "$MEGATRON_LM/megatron/training/arguments.py" ] || { echo "$MEGATRON_LM has no megatron/training/arguments.py" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import megatron.core, six, einops, regex, yaml' 2>/dev/null ||
  "$VENV/bin/pip" install -q 'megatron-core==0.15.3' six einops regex pyyaml
PYTHONPATH="$MEGATRON_LM" exec "$VENV/bin/python" "$ROOT/scripts/check_megatron_args.py" "$@"
