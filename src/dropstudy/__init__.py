"""dropstudy: overfitting studies with and without dropout, tracked in Weights & Biases."""
__version__ = "0.1.0"
