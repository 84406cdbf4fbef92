"""longdoc: classify long documents and answer questions over them with a Longformer encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names -> the module that defines them (imported on first use).
_EXPORTS = {
    "LongformerConfig": "model",
    "LongformerEncoder": "model",
    "LongformerForQuestionAnswering": "model",
    "LongformerForSequenceClassification": "model",
    "LongdocError": "errors",
    "UsageError": "errors",
    "resolve_model": "hub",
    "load_task_model": "tasks.runner",
    "Classifier": "tasks.classify",
    "load_labels": "tasks.classify",
    "QuestionAnswerer": "tasks.qa",
}
__all__ = [
    "Classifier",
    "LongdocError",
    "LongformerConfig",
    "LongformerEncoder",
    "LongformerForQuestionAnswering",
    "LongformerForSequenceClassification",
    "QuestionAnswerer",
    "UsageError",
    "__version__",
    "load_labels",
    "load_task_model",
    "resolve_model",
]

if TYPE_CHECKING:
    from .errors import LongdocError, UsageError
    from .hub import resolve_model
    from .model import (
        LongformerConfig,
        LongformerEncoder,
        LongformerForQuestionAnswering,
        LongformerForSequenceClassification,
    )
    from .tasks.classify import Classifier, load_labels
    from .tasks.qa import QuestionAnswerer
    from .tasks.runner import load_task_model


def __getattr__(name: str) -> Any:
    # Lazy: `longdoc --help` must not pay for importing torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'longdoc_cli' has no attribute {name!r}")
