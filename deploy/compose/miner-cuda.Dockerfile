# helip-miner, CUDA image (CUDA torch). Build from the repository root:
#   docker build -f deploy/compose/miner-cuda.Dockerfile -t helip/miner-cuda:latest .
# Run with a GPU: `docker run --gpus 1 ...`, or the `gpu` profile of compose.yaml, or the kubernetes gpu overlay.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 helip
WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4"
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY miner_service/ miner_service/
COPY trainer/ trainer/
COPY helip/__init__.py helip/__init__.py
# FAISS with GPU support in place of faiss-cpu, so that `--ivf-min-rows` builds its IVF on the miner's GPU
# (docs/OPERATIONS.md, "Storage and memory"). The faiss-gpu-cu12 wheel carries its own CUDA 12 runtime and cuBLAS,
# which this cu126 image matches; FAISS_GPU="" keeps faiss-cpu, and then every Mine of a GPU miner is exact.
ARG FAISS_GPU=faiss-gpu-cu12
RUN pip install . \
    && if [ -n "$FAISS_GPU" ]; then pip uninstall -y faiss-cpu && pip install "$FAISS_GPU"; fi \
    && mkdir -p /snapshots && chown helip /snapshots

USER helip
EXPOSE 50051 9464
VOLUME ["/snapshots"]
ENV HELIP_MINER_HOST=0.0.0.0 HELIP_MINER_METRICS_HOST=0.0.0.0 HELIP_MINER_SEARCH__DEVICE=cuda
ENTRYPOINT ["helip-miner"]
CMD ["serve", "--dim", "512"]
