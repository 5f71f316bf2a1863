"""gows master: supervises the worker pool and fronts it with a reverse proxy."""

__version__ = "0.1.0"
