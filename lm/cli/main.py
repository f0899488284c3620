"""`lm <verb>`: the one command-line entry point.

- `fit`, `validate`, `test`, `predict` go to LightningCLI: `--config experiments/x.yaml` (repeatable:
  later files override earlier ones), `--print_config`, any field as `--model.config.hidden_size 512`.
- Other verbs (`generate`, ...) are typed functions that jsonargparse turns into CLIs, so they take
  `--config` and `--help` alike.

Each verb's module is named in a table below ("module:function") and imported by name only when that
verb runs, which keeps `lm --help` fast and one verb's dependencies out of another's.

Bad input raises `lm.errors.LMError`, whose message says what was wrong and what to do: it is printed as
one line and `lm` exits with status 2 (set LM_DEBUG=1 to see the traceback). A command-line or YAML
mistake caught by jsonargparse becomes one too (lm/cli/config_errors.py). Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional

from jsonargparse import ArgumentError, CLI, capture_parser

from lm.cli.config_errors import explain_argument_error
from lm.errors import LMError

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
RUN_LIGHTNING_CLI = "lm.cli.lightning_cli:run_lightning_cli"  # the Lightning verbs (LightningCLI parses argv)
RUN_FINETUNE_CLI = "lm.cli.finetune_cli:run_finetune_cli"  # `lm finetune fit|validate|test`
# verb -> ("module:function",) or ("module:function", "module:prepare_args"). Each function's signature and
# docstring are its CLI; the optional second part normalizes the raw arguments first (`args -> args`).
FUNCTION_VERBS: dict[str, tuple[str, ...]] = {
    "generate": ("lm.commands.generate:generate", "lm.commands.generate:prepare_args"),  # bare sampling flags
    "serve": ("lm.commands.serve:serve",),
    "prepare": ("lm.commands.prepare:main",),  # a `main(args, prog)` builds its own parser
    "plan": ("lm.commands.plan:plan", "lm.commands.plan:prepare_args"),  # the recipe's flags as one list
    "eval": ("lm.commands.eval:evaluate", "lm.commands.eval:prepare_args"),  # bare sampling flags, as generate
    "report": ("lm.commands.report:report", "lm.commands.report:prepare_args"),  # run folders as positionals
    "merge": ("lm.commands.merge:merge",),
    "quantize": ("lm.commands.compress:quantize",),
    "prune": ("lm.commands.compress:prune",),
    "export": ("lm.commands.export:export",),
    "import": ("lm.commands.import_hf:import_hf",),  # a Hugging Face GPT-2 / Llama folder -> an lm checkpoint
}

USAGE = f"""usage: lm <verb> [--config FILE.yaml ...] [--key value ...]

Lightning verbs (train / evaluate / sample with a Trainer):
  fit        train a model                 lm fit --config experiments/wikitext2_cpu.yaml
  validate   loss, perplexity, bits/byte    lm validate --config ... --ckpt_path checkpoints/<exp>/last.ckpt
  test       same, on the test split        lm test --config ... --ckpt_path ...
  predict    write completions of prompts  lm predict --config ... --ckpt_path ... --data.prompts '[Hello]'
  finetune   fit/validate/test a task      lm finetune fit --config experiments/finetune/sst2.yaml
Other verbs:
  {'  '.join(sorted(FUNCTION_VERBS))}
  (plan: memory, speed and time of a recipe on a cluster: lm plan --config ... --devices 8 --device_kind h100)

`lm <verb> --help` lists every option of a verb."""


def main(argv: Optional[list[str]] = None) -> None:
    from_shell = argv is None  # the `lm` command: Lightning re-runs sys.argv in DDP child processes
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    verb = argv[0]
    try:
        if verb in LIGHTNING_VERBS:
            resolve(RUN_LIGHTNING_CLI)(None if from_shell else argv)
        elif verb == "finetune":
            resolve(RUN_FINETUNE_CLI)(argv[1:])
        elif verb in FUNCTION_VERBS:
            target, *prepare = FUNCTION_VERBS[verb]
            given = args = argv[1:]
            for prepare_args in prepare:
                args = resolve(prepare_args)(args)
            if target.endswith(":main"):
                resolve(target)(args, prog=f"lm {verb}")
            else:
                _run_function(resolve(target), args, f"lm {verb}", given)
        else:
            print(f"lm: unknown verb {verb!r}.\n\n{USAGE}", file=sys.stderr)
            sys.exit(2)
    except LMError as error:
        if os.environ.get("LM_DEBUG"):
            raise
        print(f"lm {verb}: error: {error}\n(set LM_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


def resolve(target: str) -> Callable:
    """The function named by `"module:function"`, its module imported now (not when `lm` starts)."""
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _run_function(function, args: list[str], prog: str, given: Optional[list[str]] = None) -> None:
    """jsonargparse's CLI of a typed function; a parse error becomes an `LMError` naming the key and the fix,
    in terms of `given` (the arguments as typed, before the verb's `prepare_args`).

    Flags must be written in full: argparse's abbreviations are off, so a near miss (`--temp 0`) is an
    unknown option with a suggestion, not silently another option (`--template`)."""
    try:
        CLI(function, args=args, prog=prog, exit_on_error=False, allow_abbrev=False)
    except ArgumentError as error:
        parser = capture_parser(lambda: CLI(function, args=[], prog=prog, exit_on_error=False, allow_abbrev=False))
        raise explain_argument_error(str(error), parser, args if given is None else given, prog) from error


if __name__ == "__main__":
    main()
