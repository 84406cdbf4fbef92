"""longdoc: classify long documents and answer questions over them with a Longformer encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "LongformerConfig",
    "LongformerEncoder",
    "LongformerForQuestionAnswering",
    "LongformerForSequenceClassification",
    "__version__",
]

if TYPE_CHECKING:
    from .model import (
        LongformerConfig,
        LongformerEncoder,
        LongformerForQuestionAnswering,
        LongformerForSequenceClassification,
    )


def __getattr__(name: str) -> Any:
    # Lazy: `longdoc --help` must not pay for importing torch.
    if name in __all__ and name != "__version__":
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'longdoc_cli' has no attribute {name!r}")
