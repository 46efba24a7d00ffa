"""InsCLR mining: in-batch selection (§5), memory banks v1 (§7) and v2 (§8), the traversal.

Public names (the training loop and tests call these): select_positives, boundaries,
parse_mode, select_candidates, MemoryBankV1, MemoryBankV2, sample_without_replacement.
"""

from insclr.mining.bank_v1 import MemoryBankV1
from insclr.mining.bank_v2 import MemoryBankV2
from insclr.mining.selection import boundaries, sample_without_replacement, select_positives
from insclr.mining.traversal import TraversalMode, parse_mode, select_candidates

__all__ = ["MemoryBankV1", "MemoryBankV2", "TraversalMode", "boundaries", "parse_mode",
           "sample_without_replacement", "select_candidates", "select_positives"]
