"""Prompt templates for instruction following: one place, shared by training (lm/data/finetuning/instruction_data.py),
`lm generate --template` and `lm eval --pairs_file --template`.

`alpaca` (the Stanford Alpaca format, word for word, so the model sees one fixed layout):

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:
    {output}<|endoftext|>

With a non-empty `input` the first sentence says "..., paired with an input that provides further
context." and an `### Input:` section follows the instruction. Everything up to and including
"### Response:\\n" is the prompt (its labels are masked); the output and end-of-text are the response.
"""

from __future__ import annotations

from lm.errors import LMError

TEMPLATES = ("alpaca",)

_ALPACA_HEAD = "Below is an instruction that describes a task{context}. Write a response that appropriately completes the request.\n\n"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one example, ending where the response begins."""
    if input.strip():
        return (_ALPACA_HEAD.format(context=", paired with an input that provides further context")
                + f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    return _ALPACA_HEAD.format(context="") + f"### Instruction:\n{instruction}\n\n### Response:\n"


def apply_template(template: str | None, text: str, input: str = "") -> str:
    """`text` as the prompt of `template` (None: the text itself)."""
    if template is None:
        return text
    if template == "alpaca":
        return alpaca_prompt(text, input)
    raise LMError(f"Unknown template {template!r}: choose one of {', '.join(TEMPLATES)} (or none).")
