"""`import_class`: the class a dotted path names (a checkpoint's `_class_path`, a recipe's `class_path`),
or an `LMError` saying how to make it importable."""

from __future__ import annotations

import importlib

from lm.errors import LMError


def import_class(class_path: str) -> type:
    """The class a checkpoint names in `hyper_parameters["_class_path"]` (a `LanguageModel` subclass)."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise LMError(f"The checkpoint was trained with {class_path}, which cannot be imported ({error}): "
                         f"run from the directory of its package or add it to PYTHONPATH.") from error
