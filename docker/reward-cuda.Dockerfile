# The reward service on an NVIDIA GPU: the CUDA runtime image, Python 3.11, and the CUDA build of the
# same torch release the server extra pins (installed first, so pip keeps it when it installs the project).
# Build from the repository root: docker build -f docker/reward-cuda.Dockerfile -t copl-reward-cuda .
# Run with the NVIDIA container toolkit: docker run --gpus all ... (compose: see compose.yaml).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /app
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY protos protos
COPY clients clients
COPY copl_common copl_common
COPY copl_cli copl_cli
COPY graph_service graph_service
COPY reward_service reward_service
COPY trainer trainer
RUN pip install --no-cache-dir '.[server]'
RUN useradd --create-home --uid 1000 copl && mkdir -p /data /registry && chown copl /data /registry
USER copl
# device auto picks CUDA when the container sees a GPU, and bf16 on it
ENV COPL_HOME=/data COPL_REGISTRY=/registry COPL_HOST=0.0.0.0 COPL_DEVICE=auto HF_HUB_OFFLINE=1
EXPOSE 50052 9452
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["copl", "health", "--target", "127.0.0.1:50052"]
ENTRYPOINT ["copl", "serve", "reward"]
