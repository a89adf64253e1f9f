"""Pendra's fetcher: runs `pendra_shared.install` for queued installs, writing verified GGUF files
and sidecars to the shared store. The arq worker arrives with the service-set issue; until then the
CLI runs the same install code in-process."""

__version__ = "0.1.0"
