"""InsCLR mining: in-batch selection (§5), memory banks v1 (§7) and v2 (§8), the traversal.

Public names (the training loop and tests call these): select_positives, boundaries,
parse_mode, select_candidates, build_bank, NoBank, MemoryBankV1, MemoryBankV2, Views,
MemoryRows, Overwritten, sample_without_replacement.
"""

from insclr.mining.bank import MemoryRows, NoBank, Overwritten, Views
from insclr.mining.bank_v1 import MemoryBankV1
from insclr.mining.bank_v2 import MemoryBankV2
from insclr.mining.selection import boundaries, sample_without_replacement, select_positives
from insclr.mining.traversal import TraversalMode, parse_mode, select_candidates

__all__ = ["MemoryBankV1", "MemoryBankV2", "MemoryRows", "NoBank", "Overwritten", "TraversalMode", "Views",
           "boundaries", "build_bank", "parse_mode", "sample_without_replacement", "select_candidates",
           "select_positives"]


def build_bank(memory, pool, dim, device):
    """The bank of the config section `memory` (MemoryConfig) over `pool` (CandidatePool), rows
    of dimension `dim` on `device`: the one place that reads memory.version."""
    import torch

    if memory.version == "none":
        return NoBank()
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[memory.dtype]  # None: the bank's own choice (bank_dtype)
    if memory.version == "v1":
        return MemoryBankV1(pool, dim, memory.potential_positive, memory.get_size, device=device, dtype=dtype,
                            exclude_rows=memory.exclude_rows)
    if memory.version == "v2":
        return MemoryBankV2(pool, dim, memory.positive_thresh, memory.negative_thresh, memory.mode,
                            memory.get_size, use_negative=memory.use_negative, device=device, dtype=dtype)
    raise ValueError(f"memory.version={memory.version!r}: expected none, v1 or v2")
