"""`Distiller`: train a (smaller) student GPT to match a frozen teacher checkpoint.

    loss = alpha * T^2 * KL(teacher || student, both softened at temperature T) + (1 - alpha) * CE

(Hinton et al. 2015: the T^2 keeps the soft term's gradients on the scale of the hard one's as T
changes.) The teacher is read from `teacher_ckpt` when fitting starts; it is frozen, in eval mode,
and kept outside the module tree, so it is neither trained, nor saved in the student's checkpoints,
nor needed to load them. Teacher and student must tokenize alike: the data's tokenizer must be the
teacher's (pass `--data.tokenizer_path` with the teacher's tokenizer.json, e.g. from
`lm export --format safetensors`), and a mismatch stops the run with that advice.

Validation and test metrics stay the plain token NLL (ppl, bpb) of the student, as for every module.

    lm fit --config experiments/wikitext2_cpu.yaml --config experiments/data/wikitext2_offline.yaml \\
        --config experiments/distill.yaml --model.init_args.teacher_ckpt checkpoints/wikitext2_cpu/last.ckpt
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.callbacks.training_context import split_windows
from lm.errors import LMError
from lm.evaluation.token_losses import IGNORE_INDEX
from lm.io.checkpoints import load_model
from lm.modules.language_model import LanguageModel


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float,
                      temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kl, ce), each a mean over the target tokens (positions with IGNORE_INDEX are skipped).

    kl = KL(teacher || student) at `temperature`: sum_v p_t(v) (log p_t(v) - log p_s(v))."""
    valid = targets != IGNORE_INDEX
    student, teacher = student_logits[valid].float(), teacher_logits[valid].float()
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student, targets[valid])
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


class Distiller(LanguageModel):
    """A `LanguageModel` whose training objective follows a teacher checkpoint (see the module docstring).

    Args:
        teacher_ckpt: Checkpoint of the teacher, written by `lm fit`; its tokenizer must be the data's.
        alpha: Weight of the distillation (KL) term; 1 - alpha weighs the cross-entropy on the data.
        temperature: Softening temperature T of both distributions in the KL term.
        **kwargs: The student's `LanguageModel` arguments (`config`, `learning_rate`, ...).
    """

    def __init__(self, teacher_ckpt: Optional[str] = None, alpha: float = 0.5, temperature: float = 2.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise LMError(f"alpha must be in [0, 1] (the weight of the KL term), got {alpha}.")
        if temperature <= 0:
            raise LMError(f"temperature must be positive, got {temperature}.")
        self.teacher_ckpt, self.alpha, self.temperature = teacher_ckpt, alpha, temperature
        self.teacher: Optional[torch.nn.Module] = None
        self.teacher_options: dict[str, bool] = {}  # forward options of the teacher (see set_teacher)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "teacher":  # a plain attribute, not a submodule: never trained, saved or counted
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None:
            self.set_teacher(*self._load_teacher())

    def _load_teacher(self):
        if not self.teacher_ckpt:
            raise LMError("Distiller needs a teacher: pass --model.init_args.teacher_ckpt PATH (a checkpoint written by `lm fit`).")
        return load_model(self.teacher_ckpt)

    def set_teacher(self, teacher: torch.nn.Module, tokenizer) -> None:
        """Use `teacher` (frozen here); `tokenizer` is the one it was trained with, checked against the student's."""
        if self.tokenizer is not None and tokenizer.to_str() != self.tokenizer.to_str():
            raise LMError(
                f"The teacher's tokenizer ({tokenizer.vocab_size} tokens) differs from the data's "
                f"({self.tokenizer.vocab_size} tokens): teacher and student must share one. Pass "
                f"--data.tokenizer_path with the teacher's tokenizer.json (`lm export --format safetensors` writes it).")
        teacher_vocab = getattr(getattr(teacher, "config", None), "vocab_size", self.config.vocab_size)
        if teacher_vocab != self.config.vocab_size:
            raise LMError(f"The teacher's vocab_size is {teacher_vocab} but the student's is {self.config.vocab_size}: "
                             f"set --data.vocab_size {teacher_vocab}.")
        teacher.eval().requires_grad_(False)
        self.teacher = teacher.to(self.device)
        # A teacher with a context cache teaches its mixture: its best prediction of the next token.
        self.teacher_options = {"context_cache": True} if getattr(teacher, "accepts_context_cache", False) else {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, targets = split_windows(batch, self.training_context)  # TrainingContextSchedule, if any
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids, **self.teacher_options)
        loss, kl, ce = distillation_loss(self(input_ids), teacher_logits, targets, self.alpha,
                                         self.temperature)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/kl", kl, on_step=True)
        self.log("train/ce", ce, on_step=True)
        self.log("train/ppl", torch.exp(ce.detach()).clamp(max=1e6), on_step=True)
        return loss
