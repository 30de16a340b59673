"""The promptbatch command line and the local all-in-one runner."""

__version__ = "0.1.0"
