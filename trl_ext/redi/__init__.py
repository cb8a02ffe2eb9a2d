"""REDI: reinforcement distillation from correct and incorrect teacher traces."""

from .config import REDIConfig
from .data import (
    PairReport,
    Verifier,
    build_redi_pairs,
    label_traces,
    math_verify_checker,
    positives,
    verify_traces,
)
from .generation import (
    TeacherDataReport,
    TraceReport,
    generate_traces,
    require_correct_traces,
    teacher_pipeline,
    traces_to_pairs,
)
from .loss import redi_loss, sequence_logps
from .trainer import REDITrainer

__all__ = [
    "PairReport",
    "REDIConfig",
    "REDITrainer",
    "TeacherDataReport",
    "TraceReport",
    "build_redi_pairs",
    "generate_traces",
    "label_traces",
    "math_verify_checker",
    "positives",
    "redi_loss",
    "require_correct_traces",
    "sequence_logps",
    "teacher_pipeline",
    "traces_to_pairs",
    "verify_traces",
    "Verifier",
]
