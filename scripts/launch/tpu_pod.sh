#!/usr/bin/env bash
# Multi-host training on a Cloud TPU VM pod slice (v4-32, v5litepod-16, ...): the same commands
# run on every worker of the slice through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   export TPU_NAME=my-pod ZONE=us-central2-b
#   bash scripts/launch/tpu_pod.sh setup    # once per slice: clone and install on every worker
#   bash scripts/launch/tpu_pod.sh train    # start training (or resume it) on every worker
#   bash scripts/launch/tpu_pod.sh logs     # follow process 0's log (worker 0)
#   bash scripts/launch/tpu_pod.sh stop     # SIGTERM everywhere: checkpoint and stop
#
# Every worker is one process driving its own TPU chips. LDM_JAX_DISTRIBUTED=1 starts
# jax.distributed, which on a TPU VM finds the worker list, this worker's index and the
# coordinator (worker 0) from the VM metadata by itself; no address or process id is passed.
# It is needed even though the TPU runtime links the chips on its own: train.py's meeting points
# and failure reports go through the coordination service that jax.distributed starts.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}
ZONE=${ZONE:?set ZONE to the zone of the TPU VM}
PROJECT=${PROJECT:-}                          # empty: gcloud's configured project
REPO_URL=${REPO_URL:-https://github.com/OWNER/ldm-jax.git}
REPO_DIR=${REPO_DIR:-ldm-jax}                 # on every worker, relative to the home directory

CONFIG=${CONFIG:-configs/ddpm_shapes.py}
# A shared filesystem mounted at the same path on every worker (Filestore over NFS, or a Cloud
# Storage bucket through gcsfuse): all processes write checkpoints into the workdir.
WORKDIR=${WORKDIR:-/mnt/shared/runs/ddpm_shapes}
# Shared, or a copy at this same path on every worker (each process reads only its own rows).
DATA_DIR=${DATA_DIR:-/mnt/shared/tensorflow_datasets}
# Compiled programs: only process 0 writes JAX's persistent cache and every process reads it, so
# a shared cache lets every worker of a re-run skip compiling.
CACHE_DIR=${CACHE_DIR:-/mnt/shared/jax_cache}
# Further train.py flags, e.g. the mesh: "--config.parallel.data=-1 --config.parallel.fsdp=8"
EXTRA_ARGS=${EXTRA_ARGS:-}

LOG=ldm_jax_train.log                         # in each worker's home directory
PID=ldm_jax_train.pid

q() { printf '%q' "$1"; }

on_workers() {  # on_workers WORKER COMMAND: run COMMAND through ssh on one worker or on all
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --worker="$1" --command="$2"
}

setup_cmd="set -e
if [ -d $(q "$REPO_DIR") ]; then git -C $(q "$REPO_DIR") pull --ff-only
else git clone $(q "$REPO_URL") $(q "$REPO_DIR"); fi
cd $(q "$REPO_DIR")
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e . 'jax[tpu]'
.venv/bin/python -c 'import jax; print(jax.local_device_count(), \"local TPU devices\")'"

# nohup and a log file: the run goes on when this ssh session ends.
train_cmd="cd $(q "$REPO_DIR") || exit 1
LDM_JAX_DISTRIBUTED=1 LDM_JAX_CACHE_DIR=$(q "$CACHE_DIR") nohup .venv/bin/python train.py \
--config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") --config.data.data_dir=$(q "$DATA_DIR") \
$EXTRA_ARGS > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/$PID"

stop_cmd="[ -f ~/$PID ] && kill -TERM \$(cat ~/$PID) 2>/dev/null || true"

case "${1:-}" in
  setup) on_workers all "$setup_cmd" ;;
  train) on_workers all "$train_cmd" ;;
  logs)  on_workers 0 "tail -n 50 -f ~/$LOG" ;;
  stop)  on_workers all "$stop_cmd" ;;
  *) echo "usage: $0 setup|train|logs|stop (with TPU_NAME and ZONE set)" >&2; exit 2 ;;
esac
