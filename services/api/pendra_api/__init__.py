"""Pendra's API gateway: the OpenAI-compatible surface and model management for the console.

It proxies chat and embeddings to the inference service and enqueues installs for the fetcher;
the routes arrive with the service-set issue. It depends on `pendra_shared` only.
"""

__version__ = "0.1.0"
