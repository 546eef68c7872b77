# The graph service (preference store, user embeddings). CPU only: the GNN serves from tables.
# Build from the repository root: docker build -f docker/graph.Dockerfile -t copl-graph .
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
RUN pip install --no-cache-dir '.[server]'
RUN useradd --create-home --uid 1000 copl && mkdir -p /data /registry && chown copl /data /registry
USER copl
# A container must listen beyond loopback: the bind rule then asks for TLS (COPL_TLS_CERT, COPL_TLS_KEY)
# or an explicit COPL_ALLOW_INSECURE_BIND=true (compose.yaml sets it for its private network).
ENV COPL_HOME=/data COPL_REGISTRY=/registry COPL_HOST=0.0.0.0 HF_HUB_OFFLINE=1
EXPOSE 50051 9451
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["copl", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["copl", "serve", "graph"]
