"""darwinfront: evolutionary and multi-objective search for compressed language models."""

__version__ = "0.1.0"
