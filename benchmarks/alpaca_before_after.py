"""Alpaca instruction tuning: BLEU / ROUGE on the held-out 10% before and after tuning, full or LoRA.

    python benchmarks/alpaca_before_after.py --backbone pretrain.ckpt                  # full, 300 steps, lr 1e-3
    python benchmarks/alpaca_before_after.py --backbone pretrain.ckpt --lora_rank 8 --learning_rate 3e-3 --skip_before
    python benchmarks/alpaca_before_after.py --backbone pretrain.ckpt --seed 1235 --skip_before   # another seed

Writes the held-out split as a pairs file, scores the backbone with the alpaca template (greedy),
tunes with experiments/finetune/alpaca.yaml (shortened), merges (`lm merge`) and scores the result
(`lm eval --pairs_file`). Prints JSON lines and the CPU. Runs in a scratch folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import fine_tuning_run  # noqa: E402
from lm.cli.main import main  # noqa: E402
from lm.data.finetuning.instruction_data import InstructionDataModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca-en-demo" / "alpaca_en_demo.json"


def scores(ckpt: str, pairs: str, max_new_tokens: int, out: str) -> dict:
    main(["eval", "--ckpt_path", ckpt, "--pairs_file", pairs, "--template", "alpaca",
          "--max_new_tokens", str(max_new_tokens), "--output", out])
    return json.loads(Path(out).read_text())["generation"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora_rank", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--skip_before", action="store_true")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the fine-tuning run (data order, adapters)")
    args, _ = fine_tuning_run(parser, "bench_alpaca")
    backbone, workdir = args.backbone, args.workdir
    held_out = InstructionDataModule(str(ALPACA)).held_out_pairs()
    pairs = workdir / "held_out.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held_out), encoding="utf-8")
    if not args.skip_before:
        before = scores(backbone, str(pairs), args.max_new_tokens, "before.json")
        print(json.dumps({"model": "backbone (before)", "examples": before["examples"], **before["scores"]}), flush=True)
    name = f"alpaca_{'lora' if args.lora_rank else 'full'}_s{args.seed}"
    start = time.perf_counter()
    main(["finetune", "fit", "--config", str(ROOT / "experiments/finetune/alpaca.yaml"), "--experiment", name,
          "--model.init_args.backbone", backbone, "--model.init_args.lora_rank", str(args.lora_rank),
          "--model.init_args.learning_rate", str(args.learning_rate), "--data.init_args.data_file", str(ALPACA),
          "--trainer.max_steps", str(args.max_steps), "--trainer.val_check_interval", str(args.max_steps),
          "--trainer.check_val_every_n_epoch", "null",  # count the interval across epochs (113 batches each)
          "--seed_everything", str(args.seed),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    seconds = round(time.perf_counter() - start)
    main(["merge", "--ckpt_path", f"checkpoints/{name}/last.ckpt", "--output", f"{name}_merged.ckpt"])
    after = scores(f"{name}_merged.ckpt", str(pairs), args.max_new_tokens, "after.json")
    print(json.dumps({"model": f"{name} (after, {args.max_steps} steps, {seconds}s)", "examples": after["examples"],
                      **after["scores"]}), flush=True)
    print(json.dumps(after["samples"][:2], ensure_ascii=False))
