# helip-train (DeepSpeed + open_clip), with torchrun for multi-node launches. Build from the repository root:
#   docker build -f deploy/compose/trainer.Dockerfile -t helip/trainer:latest .                       # CPU
#   docker build -f deploy/compose/trainer.Dockerfile -t helip/trainer-cuda:latest \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .                          # CUDA
# The CUDA torch wheels carry their own CUDA runtime, so the slim base serves both; the host needs the NVIDIA
# container toolkit. DeepSpeed's ops are JIT-built on first use (DS_BUILD_OPS=0): the configs in configs/deepspeed
# need none of them.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0

RUN useradd --create-home --uid 10001 helip
WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4" "torchvision>=0.19"
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY miner_service/ miner_service/
COPY trainer/ trainer/
COPY helip/__init__.py helip/__init__.py
RUN pip install ".[train]"
COPY configs/ configs/
RUN mkdir -p /data /runs && chown helip /data /runs

USER helip
# 29500: torch.distributed rendezvous (rank 0); 9500: the trainer's /metrics (9500 + local rank).
EXPOSE 29500 9500
ENTRYPOINT ["torchrun"]
CMD ["--nproc-per-node=1", "-m", "helip.trainer.app.cli", "--config", "configs/demo.yaml"]
