"""Pendra's inference service: llama.cpp in-process through llama-cpp-python.

It serves the store's chat and embedding models; the runtime arrives with the inference issue.
It depends on `pendra_shared` and llama-cpp-python, never on another service.
"""

__version__ = "0.1.0"
