"""lowbit.compress: pruning (magnitude, global, structured, N:M) and SVD low rank.

Each function returns a small result with the compressed tensor(s) and a
``Report`` whose bytes are those of a real storage format (``compress.storage``).
"""

from .lowrank import LowRank, break_even_rank, eckart_young_error, low_rank
from .model import LowRankLinear, factorize_model, prune_model
from .prune import PruneResult, PruneSet, global_magnitude_prune, magnitude_prune, nm_prune, structured_prune
from .storage import NM, Bitmask, Factors, Structured

__all__ = [
    "magnitude_prune", "global_magnitude_prune", "structured_prune", "nm_prune", "low_rank",
    "prune_model", "factorize_model", "PruneResult", "PruneSet", "LowRank", "LowRankLinear",
    "Bitmask", "NM", "Structured", "Factors", "break_even_rank", "eckart_young_error",
]
