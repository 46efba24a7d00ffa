"""insclr: a high-throughput trainer for self-supervised instance retrieval (InsCLR)."""

__version__ = "0.1.0"
