"""Optional dependencies: the extras of `pip install 'lm[...]'` and the one-line error when one is missing.

The core install (`pip install lm`) trains, evaluates and samples. Other capabilities bring their
libraries as extras, and the code that needs one calls :func:`require` where the verb or feature starts,
so a missing extra is an `LMError` naming what to install, not an ImportError traceback from deep inside:

    lm serve needs the serve extra (fastapi is not installed): pip install 'lm[serve]' (...)

`pyproject.toml`'s `[project.optional-dependencies]` lists the same extras (tests/test_extras.py checks
that they agree). tiktoken and cmeel-mimalloc (the `data` extra) are only speed-ups: without them
encoding falls back to HF tokenizers and the C library's malloc, silently apart from a log line.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from lm.errors import LMError

# extra -> the import names the code needs from it (its pip names are in pyproject.toml).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "finetune": ("peft",),
    "data": ("ftfy", "datasketch", "tiktoken"),  # + cmeel-mimalloc, a shared library found by path
    "report": ("matplotlib",),
    "export": ("onnx", "onnxscript"),
    "gguf": ("gguf",),  # lm export --format gguf
}


def install_hint(extra: str) -> str:
    return f"pip install 'lm[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


def require(extra: str, feature: str, modules: Optional[tuple[str, ...]] = None) -> list[ModuleType]:
    """Import `modules` (default: every module of `extra`) or raise an `LMError` saying that `feature`
    needs `extra` and how to install it. Returns the imported modules."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; extras: {sorted(EXTRAS)}")
    imported = []
    for name in modules or EXTRAS[extra]:
        try:
            imported.append(importlib.import_module(name))
        except ImportError as error:
            missing = getattr(error, "name", None)
            if missing in (None, name) or name.startswith(f"{missing}."):
                why = f"{name} is not installed"
            else:  # installed, but something it imports is not: say what
                why = f"importing {name} failed: {(str(error).splitlines() or [type(error).__name__])[0]}"
            raise LMError(f"{feature} needs the {extra} extra ({why}): {install_hint(extra)}.") from error
    return imported
