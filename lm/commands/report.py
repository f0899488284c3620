"""`lm report`: plots and a Markdown summary of one or more runs (lm/evaluation/run_report.py).

    lm report logs/wikitext2_cpu/version_0 logs/wikitext2_cpu/version_1 --output reports/compare
    lm report logs/wikitext2_cpu            # every version of the experiment

Writes `<output>/loss.png`, `perplexity.png`, `learning_rate.png`, `tokens_per_second.png` (each
against steps and against tokens seen, runs overlaid) and `<output>/report.md`.
"""

from __future__ import annotations

import json

from lm.evaluation.run_report import find_runs, plot_runs, read_run, run_names, summary_markdown
from lm.extras import require
from lm.io.files import atomic_write_text, check_folder_path, check_writable_folder


def prepare_args(args: list[str]) -> list[str]:
    """`lm report a b --output x` -> `'["a", "b"]' --output x`: every run folder is a positional argument."""
    positional, rest, i = [], [], 0
    while i < len(args):
        if args[i].startswith("--"):
            takes_value = "=" not in args[i] and args[i] not in ("--help", "-h") and i + 1 < len(args)
            rest += args[i:i + 1 + takes_value]
            i += 1 + takes_value
        else:
            positional.append(args[i])
            i += 1
    return ([json.dumps(positional)] if positional else []) + rest


def report(runs: list[str], output: str = "reports/latest") -> None:
    """Plot and summarize TensorBoard runs written by `lm fit` (or `lm finetune fit`).

    Args:
        runs: Run folders (logs/<experiment>/version_N), or experiment folders (all their versions).
        output: Folder for the PNG plots and report.md (created; files in it are replaced).
    """
    require("report", "lm report")  # matplotlib draws the plots
    check_folder_path(output, "report folder", "--output DIR")  # a file in the way: said before reading the runs
    folders = find_runs(list(runs))
    loaded = [read_run(folder, name) for folder, name in zip(folders, run_names(folders))]
    out_dir = check_writable_folder(output, "report folder", "--output DIR")  # created; read-only: one line
    plots = plot_runs(loaded, out_dir)
    markdown = summary_markdown(loaded, plots)
    atomic_write_text(out_dir / "report.md", markdown)
    print(markdown)
    print(f"Wrote {len(plots)} plots and report.md to {out_dir}/")
