"""model-tracing: was model B derived from model A? Statistics and p-values from weights and activations."""

__version__ = "0.6.0"
