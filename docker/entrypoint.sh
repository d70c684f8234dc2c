#!/usr/bin/env bash
# Container entry point: build the demo model when no checkpoint is given, then start the torchrun job.
set -euo pipefail
cd /opt/megatron-triton
if [ -z "${CHECKPOINT:-}" ]; then
  [ -f demo_model/checkpoint/latest_checkpointed_iteration.txt ] || python -m triton_backend.demo_model --out demo_model
fi
# Tensor parallelism beyond one rank is not available yet (see README); one rank per container for now.
exec torchrun --standalone --nproc-per-node "${TP:-1}" -m triton_backend.server
