# syntax=docker/dockerfile:1.7
# The inference service for hosts without a GPU: llama.cpp's CPU backend in every variant ggml has
# (x86-64 baseline, SSE4.2, AVX, AVX2, AVX-512 ..., Arm's likewise), as modules; the service loads
# the best-scored one that lives through its self-check on the CPU it runs on (a VM that reports AMX
# it will not execute gets the next). Built on one machine, it runs on any x86-64 CPU.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir uv==0.13.9
# The build settings come from pyproject.toml ([tool.uv.config-settings-package]); the script adds
# nothing for the CPU and says so in the build log.
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never UV_NO_BINARY_PACKAGE=llama-cpp-python
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY src src
COPY shared shared
COPY services services
COPY scripts scripts
RUN python scripts/llama_build.py sync --gpu cpu -- --frozen --no-dev --no-editable --package pendra-inference

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent pendra \
    && mkdir /models /var/cache/pendra && chown 10001:10001 /models /var/cache/pendra
COPY --from=build /opt/venv /opt/venv
# PENDRA_CACHE_DIR: where the service remembers which CPU variant lives on this host (its home is
# /nonexistent); compose keeps it on a volume, Kubernetes on an emptyDir.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PENDRA_MODELS_DIR=/models PENDRA_CACHE_DIR=/var/cache/pendra
USER 10001:10001
EXPOSE 8081
CMD ["python", "-m", "pendra_inference"]
