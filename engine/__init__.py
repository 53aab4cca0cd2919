"""Real-time margin engine: shared-memory book, Cython margin kernel, ZeroMQ gateways."""

__version__ = "0.1.0"
