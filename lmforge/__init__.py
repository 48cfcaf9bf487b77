"""lmforge: build your own private language model end to end."""

__version__ = "0.1.0"
