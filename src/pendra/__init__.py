"""The `pendra` command: the one entry point that ties the services and the modelstore together."""

__version__ = "0.1.0"
