#!/bin/bash
# One step of a davinci training stage inside the Megatron image (shipped in the job's ConfigMap,
# mounted at /davinci). Rendered by services/trainer/src/jobset/render.rs: the pod's environment
# names the stage and its paths, /davinci/stage-$STAGE.args holds Megatron's arguments.
#   run.sh import    HF base model -> Megatron checkpoint (Megatron-Bridge), once per run
#   run.sh train     torchrun pretrain_davinci.py on this node (JobSet: JOB_COMPLETION_INDEX is
#                    the node rank; TrainJob: torchrun reads the PET_* variables the runtime sets)
#   run.sh export    the stage's last Megatron checkpoint -> HF checkpoint, uploaded to the run
#   run.sh all       import (node 0), train, export (node 0): the TrainJob's single step
# Every step is idempotent: a restarted pod finds what an earlier attempt finished and skips it.
set -euo pipefail
STAGE=${STAGE:?STAGE is not set}
STEP=$1
ARGS_FILE=/davinci/stage-$STAGE.args
SAVE=$CKPT_ROOT/megatron/$STAGE_NAME
BASE_HF=$CKPT_ROOT/hf/base
DONE_IMPORT=$CKPT_ROOT/megatron/base/.davinci-imported
log() { echo "[davinci] $(date -u +%FT%TZ) stage $STAGE ($STAGE_NAME) $STEP: $*"; }

fetch_base() {
  if [ -f "$BASE_HF/config.json" ]; then return; fi
  log "fetching the base model $BASE_MODEL"
  python3 /davinci/objects.py download "$BASE_MODEL" "$BASE_HF"
}

do_import() {
  fetch_base
  if [ -f "$DONE_IMPORT" ]; then log "base checkpoint already imported"; return; fi
  log "importing $BASE_HF into $CKPT_ROOT/megatron/base"
  python3 /davinci/convert.py import --hf "$BASE_HF" --megatron "$CKPT_ROOT/megatron/base"
  touch "$DONE_IMPORT"
}

do_train() {
  fetch_base
  local load=()
  if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then
    log "resuming from $SAVE"
    load=(--load "$SAVE")
  else
    load=(--load "$PREV_CKPT" --finetune --no-load-optim --no-load-rng)
  fi
  mapfile -t args < "$ARGS_FILE"
  local launch=(torchrun --nproc-per-node "$GPUS_PER_NODE")
  if [ -z "${PET_NNODES:-}" ]; then
    launch+=(--nnodes "$NODES" --node-rank "${JOB_COMPLETION_INDEX:-0}"
             --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
  fi
  log "torchrun on node ${JOB_COMPLETION_INDEX:-${PET_NODE_RANK:-0}} of $NODES"
  cd "$MEGATRON_DIR"
  PYTHONPATH="$MEGATRON_DIR:/davinci:${PYTHONPATH:-}" "${launch[@]}" /davinci/pretrain_davinci.py \
    "${args[@]}" "${load[@]}" --save "$SAVE"
}

do_export() {
  local hf=$CKPT_ROOT/hf/$STAGE_NAME
  if [ ! -f "$hf/.davinci-exported" ]; then
    log "exporting $SAVE to $hf"
    rm -rf "$hf"
    python3 /davinci/convert.py export --hf-base "$BASE_HF" --megatron "$SAVE" --hf "$hf"
    touch "$hf/.davinci-exported"
  fi
  log "uploading $hf to $CHECKPOINT_URI"
  python3 /davinci/objects.py upload "$hf" "$CHECKPOINT_URI"
  log "checkpoint $CHECKPOINT_URI"
}

node_rank() { echo "${JOB_COMPLETION_INDEX:-${PET_NODE_RANK:-0}}"; }

case "$STEP" in
  import) do_import ;;
  train) do_train ;;
  export) do_export ;;
  all)
    # TrainJob: one step on every node; node 0 imports and exports, the others wait for it.
    if [ "$STAGE" = 0 ] && [ "$(node_rank)" = 0 ]; then do_import; fi
    if [ "$STAGE" = 0 ]; then
      until [ -f "$DONE_IMPORT" ]; do sleep 10; done
    fi
    do_train
    if [ "$(node_rank)" = 0 ]; then do_export; fi
    ;;
  *) echo "usage: run.sh import|train|export|all" >&2; exit 2 ;;
esac
