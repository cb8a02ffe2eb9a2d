"""Q-Tuning: joint sample and token pruning for supervised fine-tuning."""

from .. import _supported  # noqa: F401  (refuses unsupported upstream releases before TRL is imported)
from .batch import prune_labels, sample_ids_from_batch, select_samples
from .config import QTuningConfig
from .plot import EUPlaneRecord, plot_eu_plane
from .scoring import (
    QuadrantAssignment,
    assign_quadrants,
    sample_ppl_entropy,
    token_budget,
    token_keep_mask,
    token_nll_entropy,
    token_scores,
)
from .trainer import BatchSelection, QTuningSFTTrainer

__all__ = [
    "BatchSelection",
    "EUPlaneRecord",
    "QTuningConfig",
    "QTuningSFTTrainer",
    "QuadrantAssignment",
    "assign_quadrants",
    "plot_eu_plane",
    "prune_labels",
    "sample_ids_from_batch",
    "sample_ppl_entropy",
    "select_samples",
    "token_budget",
    "token_keep_mask",
    "token_nll_entropy",
    "token_scores",
]
