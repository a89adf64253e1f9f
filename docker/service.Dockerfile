# syntax=docker/dockerfile:1.7
# The slim Python services: the API gateway (PACKAGE=pendra-api) and the fetcher
# (PACKAGE=pendra-fetcher). Neither contains llama.cpp: each installs only its own workspace member
# and what it depends on, from uv.lock.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PACKAGE
RUN test -n "$PACKAGE" || (echo "build with --build-arg PACKAGE=pendra-api|pendra-fetcher" && false)
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY src src
COPY shared shared
COPY services services
RUN uv sync --frozen --no-dev --no-editable --package "$PACKAGE"

FROM ${PYTHON_IMAGE}
ARG PACKAGE
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent pendra \
    && mkdir /models && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PENDRA_MODELS_DIR=/models
USER 10001:10001
EXPOSE 8080
# pendra-api runs `python -m pendra_api`, pendra-fetcher `python -m pendra_fetcher` (compose says so too).
ENV PENDRA_SERVICE_MODULE=${PACKAGE}
CMD ["sh", "-c", "exec python -m \"$(echo \"$PENDRA_SERVICE_MODULE\" | tr - _)\""]
