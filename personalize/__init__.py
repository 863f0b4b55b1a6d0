"""Real-time personalization on PyFlink: the CLI, settings and the local stack."""

__version__ = "0.1.0"
