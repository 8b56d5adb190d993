# syntax=docker/dockerfile:1
# One image for the API and the workers (compose picks the command).
#   CPU (default):  docker build -t bone-server .
#   CUDA:           docker build -t bone-server:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only CUDA base images lack Python; their distribution pins the versions, so apt pins would only rot.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
      && rm -rf /var/lib/apt/lists/*; fi
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer: code changes do not reinstall torch. The s3 extra (s3fs) lets
# BONE_REGISTRY_URL point at object storage (docker compose --profile s3).
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
RUN mkdir -p bone core app worker cli \
    && touch bone/__init__.py core/__init__.py app/__init__.py worker/__init__.py cli/__init__.py \
    && pip install . ".[s3]" && pip uninstall -y bone-server
COPY bone ./bone
COPY core ./core
COPY app ./app
COPY worker ./worker
COPY cli ./cli
RUN pip install --no-deps .

FROM ${BASE_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; fi \
    && groupadd --system bone && useradd --system --gid bone --home-dir /data --shell /usr/sbin/nologin bone \
    && mkdir -p /data && chown bone:bone /data
COPY --from=builder /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/bone-entrypoint
ENV PATH=/opt/venv/bin:$PATH BONE_DATA_DIR=/data BONE_HOST=0.0.0.0 BONE_PORT=8000 PYTHONUNBUFFERED=1
USER bone
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["bone-entrypoint", "healthcheck"]
ENTRYPOINT ["bone-entrypoint"]
CMD ["api"]
