"""LightningModules: each wires a model, a loss, metrics and an optimizer."""

from lm.modules.language_model import LanguageModel

__all__ = ["LanguageModel"]
