"""Pendra's fetcher: an arq worker that runs `pendra_shared.install` for queued installs, writing
verified GGUF files and sidecars to the shared store, with an optional S3/MinIO mirror."""

__version__ = "0.1.0"
