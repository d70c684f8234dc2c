#!/usr/bin/env bash
# perf_analyzer (from the venv's tritonclient wheel) against a running server's ensemble.
#   tools/perf_analyzer.sh [HOST:HTTP_PORT] [CONCURRENCY_RANGE] [MAX_TOKENS]
# e.g. tools/perf_analyzer.sh localhost:8000 1:8:7 32   -> concurrency 1 and 8, 32 output tokens each
set -euo pipefail
url=${1:-localhost:${HTTP_PORT:-8000}}
range=${2:-1:8:7}
max_tokens=${3:-32}
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
data=$(mktemp --suffix=.json)
trap 'rm -f "$data"' EXIT
# end_id -1: every request generates exactly max_tokens, so requests/s converts to tokens/s.
printf '{"data": [{"text_input": ["The for statement"], "max_tokens": [%d], "end_id": [-1]}]}\n' "$max_tokens" >"$data"
LD_LIBRARY_PATH="$site/nvidia/cuda_runtime/lib" "$venv/bin/perf_analyzer" -m ensemble -u "$url" -i http \
  --input-data "$data" --concurrency-range "$range" --measurement-interval 5000 --max-trials 5 \
  --stability-percentage 20 | tee /dev/stderr | awk -v n="$max_tokens" \
  '/^Concurrency:/ {gsub(",", ""); printf "concurrency %s: %s req/s, %.0f output tokens/s, avg latency %.0f ms\n", $2, $4, $4 * n, $7 / 1000}'
