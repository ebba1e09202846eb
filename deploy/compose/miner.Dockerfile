# helip-miner, CPU image. Build from the repository root:
#   docker build -f deploy/compose/miner.Dockerfile -t helip/miner:latest .
FROM python:3.11-slim

# CPU-only torch: the default PyPI wheel bundles CUDA libraries (gigabytes) that this image never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 helip
WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4"
# The build step of setup.py generates the gRPC stubs from protos/, so protos/ must be in the context.
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY miner_service/ miner_service/
COPY trainer/ trainer/
COPY helip/__init__.py helip/__init__.py
RUN pip install . && mkdir -p /snapshots && chown helip /snapshots

USER helip
# gRPC (with grpc.health.v1) and Prometheus /metrics.
EXPOSE 50051 9464
VOLUME ["/snapshots"]
ENV HELIP_MINER_HOST=0.0.0.0 HELIP_MINER_METRICS_HOST=0.0.0.0
ENTRYPOINT ["helip-miner"]
CMD ["serve", "--dim", "512"]
