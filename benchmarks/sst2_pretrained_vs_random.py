"""SST-2 test accuracy / macro-F1: majority class vs the same classifier recipe from random init vs
from a pre-trained `lm` checkpoint (experiments/finetune/sst2.yaml, shortened), for one seed.

    python benchmarks/sst2_pretrained_vs_random.py --backbone pretrain.ckpt --seed 1 --max_steps 150

Prints one JSON line per variant and the CPU it ran on. Runs in a scratch folder (logs/, checkpoints/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import fine_tuning_run  # noqa: E402
from lm.cli.main import main  # noqa: E402
from lm.data.finetuning.classification_data import read_labelled_file  # noqa: E402
from lm.modules.classifier import classification_metrics  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2-stsa-binary"


def majority_class(data_dir: Path) -> dict:
    train = read_labelled_file(data_dir / "stsa.binary.train")
    test = read_labelled_file(data_dir / "stsa.binary.test")
    label = Counter(lab for lab, _ in train).most_common(1)[0][0]
    values = classification_metrics(2)(torch.full((len(test),), label), torch.tensor([lab for lab, _ in test]))
    return {"variant": "majority class", "test_acc": float(values["acc"]), "test_f1": float(values["f1"])}


def run(backbone: str, pretrained: bool, seed: int, max_steps: int, workdir: Path, extra: list[str]) -> dict:
    name = f"sst2_{'pretrained' if pretrained else 'random'}_seed{seed}"
    start = time.perf_counter()
    common = ["--config", str(Path(__file__).resolve().parents[1] / "experiments/finetune/sst2.yaml"),
              "--data.init_args.train_file", str(SST2 / "stsa.binary.train"),
              "--data.init_args.val_file", str(SST2 / "stsa.binary.dev"),
              "--data.init_args.test_file", str(SST2 / "stsa.binary.test"),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["finetune", "fit", *common, "--experiment", name, "--seed_everything", str(seed),
          "--model.init_args.backbone", backbone, "--model.init_args.pretrained", str(pretrained).lower(),
          "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps), *extra])
    from lm.evaluation.labelled_file import evaluate_labelled_file

    scores = evaluate_labelled_file(str(workdir / "checkpoints" / name / "last.ckpt"), str(SST2 / "stsa.binary.test"))
    return {"variant": "pretrained" if pretrained else "random init", "seed": seed, "steps": max_steps,
            "test_acc": scores["accuracy"], "test_f1": scores["macro_f1"],
            "confusion_matrix": scores["confusion_matrix"], "seconds": round(time.perf_counter() - start)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--variants", default="pretrained,random", help="which runs: pretrained, random or both")
    args, extra = fine_tuning_run(parser, "bench_sst2")
    print(json.dumps(majority_class(SST2)), flush=True)
    for pretrained in [v == "pretrained" for v in args.variants.split(",")]:
        print(json.dumps(run(args.backbone, pretrained, args.seed, args.max_steps, args.workdir, extra)), flush=True)
