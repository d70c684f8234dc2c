#!/usr/bin/env bash
# The prepared GPU check: decode against the memory bandwidth (tools/gpu_decode.py, a Llama-3.2-1B-shaped model),
# then TP=1 on CUDA with NCCL, the demo model and a ~350M random-init GPT in
# bfloat16, tokens/s at batch 1, 16 and 32 through the in-process engine (PyTriton does not install there): Megatron's
# modules (COMPILE=0), the fast forward run eagerly (CUDA_GRAPHS=0) and replayed as CUDA graphs (the default).
#
# Here, before the device call (see the device tool's README for the pip download flags):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1 psutil
#   make demo-model
# Device call: carry [".whl", "demo_model"], command: bash tools/gpu_check.sh
# Figures land in $OUT/gpu_check.jsonl.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD DEVICE=cuda DTYPE=bfloat16
out=${OUT:-/tmp}/gpu_check.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out.gpu"
bench() {  # checkpoint, label: Megatron's modules, the fast forward eagerly, then its decode steps as CUDA graphs
  for mode in "0 0" "1 0" "1 1"; do
    set -- "$1" "$2" ${mode}
    COMPILE=$3 CUDA_GRAPHS=$4 torchrun --standalone --nproc-per-node 1 -m tools.offline --checkpoint "$1" \
      --tokenizer demo_model/tokenizer.model --bench --batch 1 16 32 --max-tokens 128 --prompt "The for statement" \
      2>"$out.$2.$3$4.log" | sed "s/^{/{\"model\": \"$2\", \"compile\": $3, \"cuda_graphs\": $4, /" | tee -a "$out"
  done
}
# first the attention's figures: decode step time against the bytes it must read (weights + live KV) at 1 and 64
# sequences x 1k / 8k / 32k, as a fraction of the card's bandwidth; a prefill chunk; waits on the device per decode step
python3 tools/gpu_decode.py 2>"$out.decode.log" | tee -a "$out"
# ours against Megatron-core's dynamic engine, same weights, 16 x 128 greedy tokens (its failure stops nothing)
python3 tools/gpu_megatron_engine.py 2>"$out.megatron.log" | tee -a "$out" || true
bench demo_model/checkpoint demo
torchrun --standalone --nproc-per-node 1 -m triton_backend.make_checkpoint --random gpt-350m --vocab 4096 \
  --format torch_dist --out /tmp/gpt350m 2>"$out.make.log" | tee -a "$out.make.log"
bench /tmp/gpt350m gpt-350m
