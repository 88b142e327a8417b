"""dlntorch — a PyTorch laboratory for the Deep Linear Network W = W_N ⋯ W_1."""
__version__ = "0.1.0"

__all__ = ["__version__"]
