"""Evaluation: revisited Oxford/Paris (+R-1M), INSTRE and GLDv2 retrieval (ALGORITHM §11).

`python -m insclr.evaluate --model imagenet|random|CHECKPOINT --data roxford5k,rparis6k ...`
"""

from insclr.evaluate.cli import main
from insclr.evaluate.core import evaluate
from insclr.evaluate.metrics import revisitop_map

__all__ = ["revisitop_map", "evaluate", "main"]
