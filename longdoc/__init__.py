"""``import longdoc``: the library under its short name, the same objects as ``longdoc_cli``
(``longdoc.Classifier is longdoc_cli.Classifier``), loaded on first use like there."""

from __future__ import annotations

from typing import Any

import longdoc_cli
from longdoc_cli import __all__, __version__  # noqa: F401


def __getattr__(name: str) -> Any:
    return getattr(longdoc_cli, name)


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__version__"})
