"""Pendra's API gateway: the OpenAI-compatible surface (proxied to the inference service) and
model management for the console (installs queued for the fetcher). It depends on `pendra_shared`
only; `pendra serve` also mounts its management routes over an in-process queue."""

__version__ = "0.1.0"
