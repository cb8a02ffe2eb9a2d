"""REDI: reinforcement distillation from correct and incorrect teacher traces."""

from .config import REDIConfig
from .data import PairReport, build_redi_pairs, label_traces, positives, verify_trace
from .loss import redi_loss, sequence_logps
from .trainer import REDITrainer

__all__ = [
    "PairReport",
    "REDIConfig",
    "REDITrainer",
    "build_redi_pairs",
    "label_traces",
    "positives",
    "redi_loss",
    "sequence_logps",
    "verify_trace",
]
