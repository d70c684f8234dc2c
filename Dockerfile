# GPU image: the Megatron-core GPT ensemble behind Triton (PyTriton bundles the tritonserver binary).
#   docker build -t megatron-triton .
#   docker run --gpus all --shm-size 2g -p 8000-8002:8000-8002 -p 9000:9000 -v /ckpt:/ckpt \
#     -e CHECKPOINT=/ckpt/megatron -e TOKENIZER=/ckpt/tokenizer megatron-triton
FROM nvcr.io/nvidia/pytorch:24.12-py3

WORKDIR /opt/megatron-triton
COPY requirements.txt .
COPY docker/check_pins.py docker/
# The versions the tests ran against, torch included: PyPI's CUDA build of the pinned release replaces the base
# image's own (its pip constraints would hold it back). The build fails if any installed package is not its pin.
RUN PIP_CONSTRAINT="" pip install --no-cache-dir -r requirements.txt \
    && python docker/check_pins.py requirements.txt

COPY preprocessing/ preprocessing/
COPY triton_backend/ triton_backend/
COPY model_repository/ model_repository/
COPY client/ client/
COPY api/ api/
COPY tools/ tools/
COPY docker/ docker/

ENV HOST=0.0.0.0 HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002 DEVICE=cuda
EXPOSE 8000 8001 8002 9000
# Ready means the whole pipeline can serve: the ensemble, not just the Triton process.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/opt/megatron-triton/docker/healthcheck.sh"]
ENTRYPOINT ["/opt/megatron-triton/docker/entrypoint.sh"]
