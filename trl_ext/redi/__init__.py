"""REDI: reinforcement distillation from correct and incorrect teacher traces."""

from .. import _supported  # noqa: F401  (refuses unsupported upstream releases before TRL is imported)
from .config import REDIConfig
from .data import (
    PairReport,
    Verifier,
    as_label,
    build_redi_pairs,
    check_labels,
    label_traces,
    math_verify_checker,
    positives,
    read_labels,
    verify_traces,
)
from .generation import (
    TeacherDataReport,
    TraceReport,
    check_generation_args,
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
    "as_label",
    "build_redi_pairs",
    "check_generation_args",
    "check_labels",
    "generate_traces",
    "label_traces",
    "math_verify_checker",
    "positives",
    "read_labels",
    "redi_loss",
    "require_correct_traces",
    "sequence_logps",
    "teacher_pipeline",
    "traces_to_pairs",
    "verify_traces",
    "Verifier",
]
