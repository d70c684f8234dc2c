#!/usr/bin/env bash
# Start-up time and in-process tokens/s for each tensor-parallel size (CPU: gloo ranks stand in for GPUs).
#   tools/probes/tp_scaling.sh [TP sizes...]        default: 1 2 4 8
# Prints, per TP: seconds until /v2/models/ensemble/ready answers 200 for `torchrun -m triton_backend.server`,
# then the offline engine benchmark (greedy, 32 tokens per request) at batch 1 and 8.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=$root/.venv
port=${HTTP_PORT:-18500}
for tp in "${@:-1 2 4 8}"; do
  for n in $tp; do
    start=$(date +%s.%N)
    TP=$n HTTP_PORT=$port GRPC_PORT=$((port + 1)) METRICS_PORT=$((port + 2)) HOST=127.0.0.1 \
      setsid "$venv/bin/torchrun" --standalone --nproc-per-node "$n" -m triton_backend.server >"/tmp/tp_scaling_$n.log" 2>&1 &
    job=$!
    until curl -sf "localhost:$port/v2/models/ensemble/ready" >/dev/null; do
      kill -0 $job 2>/dev/null || { echo "TP=$n: server exited, see /tmp/tp_scaling_$n.log"; exit 1; }
      sleep 0.5
    done
    ready=$(echo "$(date +%s.%N) - $start" | bc)
    kill -TERM $job; wait $job || true
    printf '{"tp": %d, "server_ready_s": %.1f}\n' "$n" "$ready"
    "$venv/bin/torchrun" --standalone --nproc-per-node "$n" -m tools.offline --bench --batch 1 8 \
      --max-tokens 32 2>/dev/null | grep '^{'
  done
done
