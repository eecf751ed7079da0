"""optimsweep: sweep files in, comparable PyTorch experiments out."""

__version__ = "0.1.0"
