"""`lm report`: TensorBoard runs -> PNG plots and a Markdown summary.

What this file does:
- `find_runs(folders)`: every run under the given folders (a folder holding `events.out.tfevents.*`,
  e.g. logs/<experiment>/version_N; a parent such as logs/<experiment> expands to its versions);
- `read_run(folder)`: the run's scalars (TensorBoard's `EventAccumulator`), its `config.yaml`,
  wall time, and tokens/s (the throughput callback's `items_per_sec` when logged, else derived from
  `train/tokens_seen` and the events' wall-clock times);
- `plot_runs(runs, out_dir)`: one PNG per quantity (loss, perplexity, learning rate, tokens/s), each
  with two panels, against optimizer steps and against tokens seen; runs overlaid, one colour each;
- `summary_markdown(runs)`: parameter count, steps, wall time, best and final metrics per run, and
  the config keys whose values differ between runs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.errors import LMError, MissingFileError
from lm.io.files import atomic_write_bytes
from lm.model import GPTConfig, build_gpt

Series = list[tuple[int, float, float]]  # (step, value, wall time)

# (file stem, title, y label, tags plotted: train and validation where both exist)
PLOTS = (
    ("loss", "Loss", "cross-entropy (nats / token)", ("train/loss", "val/loss")),
    ("perplexity", "Perplexity", "perplexity", ("train/ppl", "val/ppl")),
    ("learning_rate", "Learning rate", "learning rate", ("lr",)),
    ("tokens_per_second", "Throughput", "tokens / s", ("tokens_per_sec",)),
)


@dataclass
class Run:
    name: str
    folder: Path
    scalars: dict[str, Series]
    config: dict[str, Any] = field(default_factory=dict)
    model_config: Optional[dict[str, Any]] = None  # GPTConfig fields from hparams.yaml

    def series(self, tag: str) -> Series:
        if tag == "lr":  # LearningRateMonitor: lr-<Optimizer>[/pgN]; the first group is the decayed one
            tag = next((t for t in sorted(self.scalars) if t.startswith("lr-")), tag)
        return self.scalars.get(tag, [])

    @property
    def wall_time(self) -> float:
        times = [w for s in self.scalars.values() for _, _, w in s]
        return max(times) - min(times) if times else 0.0

    def tokens_at(self, step: int) -> Optional[float]:
        """Tokens seen at `step` (linear between logged points; None without `train/tokens_seen`)."""
        seen = self.scalars.get("train/tokens_seen")
        if not seen:
            return None
        per_step = seen[-1][1] / max(seen[-1][0], 1)
        return step * per_step  # tokens/step is constant while the batch shape is (lm fit logs it so)


def find_runs(folders: list[str]) -> list[Path]:
    runs = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise MissingFileError(f"Run folder not found: {folder} (runs live in logs/<experiment>/version_N).")
        found = sorted({p.parent for p in folder.rglob("events.out.tfevents.*")})
        if not found:
            raise LMError(f"No TensorBoard event files under {folder}: pass a run folder such as logs/<experiment>/version_0.")
        runs += found
    return runs


def read_run(folder: Path, name: str) -> Run:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    scalars = {tag: [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    rate = next((v for t, v in scalars.items() if t.endswith("items_per_sec")), None)
    scalars["tokens_per_sec"] = rate or _tokens_per_second(scalars.get("train/tokens_seen", []))
    config_file = folder / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    hparams_file = folder / "hparams.yaml"  # the module's saved hyper-parameters: a fine-tune's backbone config
    hparams = yaml.safe_load(hparams_file.read_text(encoding="utf-8")) if hparams_file.is_file() else {}
    return Run(name, folder, scalars, config or {}, (hparams or {}).get("config"))


def _tokens_per_second(seen: Series) -> Series:
    """Rate between consecutive `train/tokens_seen` points (skipping the first, which includes start-up)."""
    return [(s1, (v1 - v0) / (w1 - w0), w1) for (s0, v0, w0), (s1, v1, w1) in zip(seen[1:], seen[2:]) if w1 > w0]


def run_names(folders: list[Path]) -> list[str]:
    """Short unique labels: experiment/version."""
    return ["/".join(f.parts[-2:]) for f in folders]


def plot_runs(runs: list[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for stem, title, ylabel, tags in PLOTS:
        if not any(run.series(tag) for run in runs for tag in tags):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for colour, run in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, runs):
            for tag, style in zip(tags, ("-", "--")):
                points = run.series(tag)
                if not points:
                    continue
                label = f"{run.name} {tag.split('/')[0] if len(tags) > 1 else ''}".strip()
                marker = "o" if len(points) < 20 else None
                steps = [s for s, _, _ in points]
                axes[0].plot(steps, [v for _, v, _ in points], style, color=colour, marker=marker, label=label)
                if run.tokens_at(1) is not None:
                    axes[1].plot([run.tokens_at(s) for s in steps], [v for _, v, _ in points], style, color=colour,
                                 marker=marker, label=label)
        for ax, xlabel in zip(axes, ("optimizer step", "tokens seen")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if stem == "perplexity":
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8)
        axes[0].set_title(f"{title} vs steps")
        axes[1].set_title(f"{title} vs tokens seen")
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        png = io.BytesIO()
        fig.savefig(png, dpi=100, format="png")
        plt.close(fig)
        atomic_write_bytes(path, png.getvalue())  # a reader never sees half a picture
        written.append(path)
    return written


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        return {k: v for key, value in config.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): config}


def config_diff(runs: list[Run]) -> dict[str, list[Any]]:
    """Config keys (dotted) whose values differ between runs, with each run's value."""
    flat = [_flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if len({repr(f.get(k)) for f in flat}) > 1}


def parameter_count(run: Run) -> Optional[int]:
    """Parameters of the run's GPT, built on the meta device (no memory), from its saved config:
    the module's hyper-parameters, else config.yaml (whose vocab_size is linked from data.vocab_size)."""
    model = run.config.get("model") or {}
    gpt_config = run.model_config or dict((model.get("init_args") or model).get("config") or {})
    data = run.config.get("data") or {}
    if gpt_config and "vocab_size" not in gpt_config and (data.get("init_args") or data).get("vocab_size"):
        gpt_config["vocab_size"] = (data.get("init_args") or data)["vocab_size"]
    if not gpt_config:
        return None
    try:
        with torch.device("meta"):
            return build_gpt(GPTConfig.from_dict(gpt_config)).num_parameters()
    except (ValueError, TypeError):
        return None


def _best_final(series: Series, best=min) -> tuple[str, str]:
    if not series:
        return "-", "-"
    return f"{best(v for _, v, _ in series):.4f}", f"{series[-1][1]:.4f}"


def summary_markdown(runs: list[Run], plots: list[Path]) -> str:
    lines = ["# Run report", "", "| run | parameters | steps | wall time | train loss (final) | val loss (best / final) "
             "| val ppl (best) | val bpb (best / final) |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        params = parameter_count(run)
        steps = max((s for series in run.scalars.values() for s, _, _ in series), default=0)
        val_best, val_final = _best_final(run.series("val/loss"))
        bpb_best, bpb_final = _best_final(run.series("val/bpb"))
        ppl_best, _ = _best_final(run.series("val/ppl"))
        _, train_final = _best_final(run.series("train/loss"))
        lines.append(f"| {run.name} | {f'{params / 1e6:.2f}M' if params else '-'} | {steps} | "
                     f"{_duration(run.wall_time)} | {train_final} | {val_best} / {val_final} | {ppl_best} | "
                     f"{bpb_best} / {bpb_final} |")
    diff = config_diff(runs) if len(runs) > 1 else {}
    lines += ["", "## Config differences", ""]
    if len(runs) < 2:
        lines.append("(one run: nothing to compare)")
    elif not diff:
        lines.append("(the runs' config.yaml files are identical)")
    else:
        lines += ["| key | " + " | ".join(run.name for run in runs) + " |", "|---" * (len(runs) + 1) + "|"]
        lines += [f"| {key} | " + " | ".join(f"`{v}`" for v in values) + " |" for key, values in diff.items()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
