"""The one place that finds grammar/ and templates/, in a checkout or inside an installed wheel."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    # Installed wheel: shipped as convdsl/<name>. Checkout or editable install: <repo>/<name>.
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"convdsl installation is missing its {name}/ folder")


def grammar_path() -> Path:
    return _find("grammar") / "convdsl.lark"


def templates_dir() -> Path:
    return _find("templates")
