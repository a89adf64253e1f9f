"""Pendra's common core, used by the CLI and by every service.

It holds what all of Pendra agrees on: the settings, the GGUF modelstore on disk, the catalogue of
installable variants and the install code that downloads and verifies them. Nothing here imports a
web framework, a queue or llama.cpp, so `pendra models ...` works on a bare install.
"""

__version__ = "0.1.0"
