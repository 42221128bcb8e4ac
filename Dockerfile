# syntax=docker/dockerfile:1
#
# One image recipe, two targets:
#   docker build --target gateway .   # HTTP gateway: the base dependencies only, no torch
#   docker build --target worker .    # GPU worker: `.[worker]` (torch, transformers, ...)
#
# The worker's torch comes from PyPI; its Linux wheels bundle the CUDA runtime,
# so the host needs only the NVIDIA driver and container toolkit. A CUDA base
# image (e.g. nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 with Python 3.11
# added) can replace PYTHON_IMAGE for the worker where the site standardises on one.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
# HF_HUB_OFFLINE: models load from local disk or the operator's bucket; the hub is never contacted.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1
RUN groupadd --system --gid 10001 vlmq \
    && useradd --system --uid 10001 --gid vlmq --create-home --home-dir /home/vlmq vlmq
WORKDIR /app

# Dependencies are installed from pyproject.toml alone (with empty package
# stubs), so a code change rebuilds only the last layer, not torch.
FROM base AS gateway
COPY pyproject.toml README.md* ./
RUN mkdir shared api_gateway worker \
    && touch shared/__init__.py api_gateway/__init__.py worker/__init__.py \
    && pip install . \
    && rm -rf /app/*
RUN --mount=type=bind,source=.,target=/src,rw pip install --no-deps --force-reinstall /src
USER vlmq
EXPOSE 8000
CMD ["vlmq", "gateway", "--host", "0.0.0.0"]

FROM base AS worker
COPY pyproject.toml README.md* ./
RUN mkdir shared api_gateway worker \
    && touch shared/__init__.py api_gateway/__init__.py worker/__init__.py \
    && pip install ".[worker]" \
    && rm -rf /app/*
RUN --mount=type=bind,source=.,target=/src,rw pip install --no-deps --force-reinstall /src
# The model cache is a volume in compose; a directory owned by the app user
# here gives a fresh named volume that ownership.
ENV VLMQ_MODEL_CACHE_DIR=/models
RUN mkdir /models && chown vlmq:vlmq /models
USER vlmq
CMD ["vlmq", "worker"]
