# syntax=docker/dockerfile:1.7
# The inference service with llama.cpp built for NVIDIA GPUs: llama-cpp-python is compiled with
# GGML_CUDA=ON on the CUDA development image, and the result runs on the matching runtime image.
# Backends are modules: the CUDA one, and every CPU variant (the service picks the CPU's best), so a
# host whose driver is missing still serves, on the CPU, and says why.
ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9
# scripts/llama_build.py --gpu cuda adds GGML_CUDA=ON for compute capabilities from Turing (T4) to
# Hopper (H100/H200) to pyproject.toml's settings; the driver's libcuda comes at run time, so the
# build links against the stub.
ENV PATH=/opt/uv/bin:$PATH \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON=/usr/bin/python3 UV_PYTHON_DOWNLOADS=never UV_NO_BINARY_PACKAGE=llama-cpp-python
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY src src
COPY shared shared
COPY services services
COPY scripts scripts
RUN ln -s /usr/local/cuda/lib64/stubs/libcuda.so /usr/local/cuda/lib64/stubs/libcuda.so.1 \
    && python3 scripts/llama_build.py sync --gpu cuda -- --frozen --no-dev --no-editable --package pendra-inference

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent pendra \
    && mkdir /models /var/cache/pendra && chown 10001:10001 /models /var/cache/pendra
COPY --from=build /opt/venv /opt/venv
# PENDRA_CACHE_DIR: where the service remembers which CPU variant lives on this host (its home is
# /nonexistent); compose keeps it on a volume, Kubernetes on an emptyDir.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PENDRA_MODELS_DIR=/models PENDRA_CACHE_DIR=/var/cache/pendra \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8081
CMD ["python", "-m", "pendra_inference"]
