#!/usr/bin/env bash
# Container entry point: build the demo model when no checkpoint is given, then start this node's part of the
# torchrun job (triton_backend/launch.py) with one rank per visible GPU: TP defaults to GPUs x NNODES / PP.
# Several nodes: NNODES, NODE_RANK and MASTER_ADDR, as for `make serve` (deploy/k8s/multi-node sets them).
set -euo pipefail
cd /opt/megatron-triton
if [ -z "${CHECKPOINT:-}" ]; then
  [ -f demo_model/checkpoint/latest_checkpointed_iteration.txt ] || python -m tools.demo_model --out demo_model
fi
# A LeaderWorkerSet pod (deploy/k8s/multi-node): the group's leader is node 0.
if [ -n "${LWS_LEADER_ADDRESS:-}" ]; then
  export MASTER_ADDR=${MASTER_ADDR:-$LWS_LEADER_ADDRESS} NODE_RANK=${NODE_RANK:-${LWS_WORKER_INDEX:-0}} \
         NNODES=${NNODES:-${LWS_GROUP_SIZE:-1}}
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
export TP=${TP:-$(( (gpus > 0 ? gpus : 1) * ${NNODES:-1} / ${PP:-1} ))}
exec python -m triton_backend.launch
