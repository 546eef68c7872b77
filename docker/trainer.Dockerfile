# The trainer and the Ray head: the project with Ray. By default it runs a Ray head node; training runs in
# it with `copl train` (compose: `docker compose run --rm trainer copl train --profile small`).
# Build from the repository root: docker build -f docker/trainer.Dockerfile -t copl-trainer .
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
RUN pip install --no-cache-dir '.[server]' 'ray[default]==2.60.0'
RUN useradd --create-home --uid 1000 copl && mkdir -p /data /registry && chown copl /data /registry
USER copl
ENV COPL_HOME=/data COPL_REGISTRY=/registry HF_HUB_OFFLINE=1
# 6379: the Ray head (GCS), 8265: the Ray dashboard and job API
EXPOSE 6379 8265
CMD ["ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--block"]
