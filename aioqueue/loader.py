"""Finding an App from a ``module:attribute`` string, as the CLI and process children do."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import App

__all__ = ["load_app"]


def _import_module(name: str) -> object:
    if name.endswith(".py") or os.sep in name:
        path = Path(name).resolve()
        if not path.exists():
            raise ConfigurationError(f"no such file: {name}")
        sys.path.insert(0, str(path.parent))
        name = path.stem
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise ConfigurationError(f"cannot import {name!r}: {exc}") from exc
        raise


def load_app(path: str) -> App:
    """Import ``module:attr`` (or ``module``, finding its App, or ``file.py:attr``)."""
    from .app import App

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = path.partition(":")
    module = _import_module(module_name)
    if attr:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}")
        candidates = [obj]
    else:
        candidates = [v for v in vars(module).values() if isinstance(v, App)]
        if len(candidates) != 1:
            raise ConfigurationError(
                f"module {module_name!r} defines {len(candidates)} apps; name one as module:attr"
            )
    app = candidates[0]
    if not isinstance(app, App):
        raise ConfigurationError(f"{path!r} is a {type(app).__name__}, not an aioqueue App")
    if app.import_path is None:
        importable = Path(module_name).stem if module_name.endswith(".py") else module_name
        app.import_path = f"{importable}:{attr or _attr_of(module, app)}"
    return app


def _attr_of(module: object, app: object) -> str:
    return next(name for name, value in vars(module).items() if value is app)
