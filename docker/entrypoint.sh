#!/usr/bin/env bash
# Container entry point: build the demo model when no checkpoint is given, then start the torchrun job with
# one rank per visible GPU (override with TP).
set -euo pipefail
cd /opt/megatron-triton
if [ -z "${CHECKPOINT:-}" ]; then
  [ -f demo_model/checkpoint/latest_checkpointed_iteration.txt ] || python -m tools.demo_model --out demo_model
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
export TP=${TP:-$(( gpus > 0 ? gpus : 1 ))}
exec torchrun --standalone --nproc-per-node "$TP" -m triton_backend.server
