"""`lm prepare`: run the data pipeline of an experiment YAML and print the data report.

    lm prepare --config experiments/wikitext2_cpu.yaml --config experiments/data/wikitext2_offline.yaml
    lm prepare --config experiments/data/jsonl_cleaned.yaml --data.cleaning.near_dedup true

Takes the same `--config` files as `lm fit` (their `data:` section is used, and the model's context, which
cuts the windows of LitData chunks as it does in `lm fit`; `trainer:` and the other sections of a recipe are
accepted and ignored) and the same `--data.*` overrides (`data.block_size` is refused, as by `lm fit`). Cleans,
trains or loads the tokenizer and tokenizes every split into the token cache (`data.cache_dir`), then
prints the report (documents in/out, removed per cleaning step, PII replacements, tokens, bytes per
token, time per stage; with `--data.bpe_dropout P` also the training split's BPE-dropout variants, one line),
also saved as JSON under `<cache_dir>/reports/`. A later `lm fit` with the
same data settings finds the cache and says so ("Token cache hit"). Two preparations of the same data at
once (two `lm prepare`, or `lm fit` runs started together) build it once: the second logs that it waits
for the first (its pid), then uses what the first wrote (lm/data/preparation/pipeline.py).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from lm.cli.config_errors import explain_argument_error
from lm.cli.lightning_cli import parse_recipe
from lm.cli.run_checks import refuse_block_size
from lm.data import TextDataModule
from lm.data.preparation.pipeline import format_report

_IGNORED_SECTIONS = ("experiment", "seed_everything", "trainer", "model", "ckpt_path", "optimizer", "lr_scheduler")


def build_parser(prog: str = "lm prepare") -> Any:
    """`--config` + every `--data.*` option of TextDataModule; a recipe's other sections are ignored."""
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n")[0], default_env=False, exit_on_error=False,
                            allow_abbrev=False)  # a near miss (--data.vocab 300) is an error, not another option
    parser.add_argument("--config", action=ActionConfigFile, help="experiment YAML (repeatable; later files win)")
    parser.add_class_arguments(TextDataModule, "data")
    for section in _IGNORED_SECTIONS:  # the rest of a training recipe: accepted, not used here
        used = "only its context is read, as lm fit merges it" if section == "model" else "ignored by lm prepare"
        parser.add_argument(f"--{section}", type=Optional[Any], default=None, help=f"({used})")
    return parser


def main(args: list[str], prog: str = "lm prepare") -> None:
    refuse_block_size(args)
    parser = build_parser(prog)
    try:
        config = parser.parse_args(args)
    except ArgumentError as error:
        raise explain_argument_error(str(error), parser, args, prog) from error
    # The windows' length is the model's context, merged and linked exactly as `lm fit` does it (this parser
    # keeps a recipe's model section as an opaque value: a later file would replace it, not merge into it).
    config.data.block_size = parse_recipe(args).data.block_size
    datamodule = parser.instantiate_classes(config).data
    _show_data_logs()
    datamodule.prepare_data()
    print(format_report(datamodule.report))
    print(f"report: {datamodule.report_file}")


def _show_data_logs() -> None:
    log = logging.getLogger("lm.data")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
