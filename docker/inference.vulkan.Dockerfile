# syntax=docker/dockerfile:1.7
# The inference service with llama.cpp's Vulkan backend, for AMD and Intel GPUs (Mesa's RADV and
# ANV drivers) and any other GPU with a Vulkan driver. Backends are modules: Vulkan, and every CPU
# variant (the service picks the CPU's best), so a host without a usable GPU still serves, on the
# CPU, and says why. Run it with the host's /dev/dri passed through (compose.vulkan.yaml).
ARG UBUNTU_IMAGE=ubuntu:24.04

FROM ${UBUNTU_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
       libvulkan-dev glslc spirv-headers \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9
ENV PATH=/opt/uv/bin:$PATH \
    UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON=/usr/bin/python3 UV_PYTHON_DOWNLOADS=never UV_NO_BINARY_PACKAGE=llama-cpp-python
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY src src
COPY shared shared
COPY services services
COPY scripts scripts
RUN python3 scripts/llama_build.py sync --gpu vulkan -- --frozen --no-dev --no-editable --package pendra-inference

FROM ${UBUNTU_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 libvulkan1 mesa-vulkan-drivers \
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
