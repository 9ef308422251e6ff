"""densemtl: multi-task dense scene understanding in PyTorch."""

__version__ = "0.1.0"
