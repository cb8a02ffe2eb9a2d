"""REDI: reinforcement distillation from correct and incorrect teacher traces."""

from .config import REDIConfig
from .data import PairReport, Verifier, build_redi_pairs, label_traces, math_verify_checker, positives
from .loss import redi_loss, sequence_logps
from .trainer import REDITrainer

__all__ = [
    "PairReport",
    "REDIConfig",
    "REDITrainer",
    "build_redi_pairs",
    "label_traces",
    "math_verify_checker",
    "positives",
    "redi_loss",
    "sequence_logps",
    "Verifier",
]
