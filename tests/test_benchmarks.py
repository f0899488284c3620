"""The benchmark scripts run end to end (tiny model, few steps) and print their tables.

Their figures are measurements, not assertions: these tests only keep the scripts from rotting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT as ROOT
TINY = ["--layers", "1", "--heads", "2", "--hidden", "32", "--vocab", "128"]


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *TINY, *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_throughput_prints_both_loops_and_the_fixed_overhead():
    out = run("train_throughput.py", "--precisions", "32-true", "--compile", "off", "--block-size", "16",
              "--batch-size", "2", "--steps", "3", "--warmup", "1", "--no-progress-bar")
    rows = [line for line in out.splitlines() if line.startswith("| 32-true | off |")]
    assert [row.split("|")[3].strip() for row in rows] == ["plain", "lightning"]
    assert rows[1].rstrip(" |").endswith("%")  # the overhead column is filled in
    assert "Lightning's fixed cost per step" in out and "ms per step" in out


def test_generate_benchmark_prints_cache_and_no_cache_speeds():
    out = run("generate.py", "--context", "32", "--prompt-tokens", "4", "--new-tokens", "8", "--runs", "1",
              "--threads", "1", "--dtypes", "float32", "--paths", "eager")
    row = next(line for line in out.splitlines() if line.startswith("| 1 | float32 | eager |"))
    cache, no_cache = (float(cell) for cell in row.split("|")[4:6])
    assert cache > 0 and no_cache > 0


def test_generate_benchmark_decodes_a_batch_and_counts_every_row():
    out = run("generate.py", "--context", "32", "--prompt-tokens", "4", "--new-tokens", "8", "--runs", "1",
              "--threads", "1", "--dtypes", "float32", "--paths", "eager", "prepared", "--no-baseline", "--batch", "3")
    assert "batch 3, 4-token prompts" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1 | float32 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["eager", "prepared"]  # the same tokens: no warning
    assert all(float(row.split("|")[4]) > 0 for row in rows)


def test_serve_load_runs_both_phases(tmp_path):
    import json

    from tests.serve_support import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.ckpt", steps=1)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--ckpt_path", str(ckpt),
                             "--clients", "2", "--duration", "2", "--max_tokens", "4", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r.get("phase") for r in rows[:2]] == ["2 clients", "1 client"]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in rows[:2]) and rows[2]["rss_mb_before"] > 0


@pytest.mark.slow
def test_quality_benchmark_trains_for_its_budget_and_scores_the_raw_test_file(tmp_path):
    """benchmarks/quality.py on the real protocol files with a tiny model and a 15 s budget."""
    import json

    from tests.helpers import WIKITEXT_DIR

    if not (WIKITEXT_DIR / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 raw files not found in {WIKITEXT_DIR}")
    tiny = ["--model.config.hidden_size", "32", "--model.config.num_hidden_layers", "1",
            "--model.config.num_attention_heads", "2", "--model.config.max_position_embeddings", "64",
            "--data.vocab_size", "512", "--trainer.val_check_interval", "20",
            "--data.cache_dir", str(tmp_path / "cache")]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--budget", "15", "--name", "q",
                             "--workdir", str(tmp_path), "--", *tiny], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "logs" / "q_quality.json").read_text())["runs"][0]
    assert run["test_bytes"] == (WIKITEXT_DIR / "wiki.test.raw").stat().st_size  # every byte of the raw file
    assert run["steps"] >= 20 and run["val_curve"] and 1.0 < run["test_bpb"] < 10.0
    assert "val_loss" in run["best_checkpoint"] and (tmp_path / "checkpoints" / "q_s1234").is_dir()
    assert not (ROOT / "checkpoints" / "q_s1234").exists()  # moved into --workdir
    assert 0.0 <= run["gen_rep4"] <= 1.0 and 0.0 < run["gen_distinct_2"] <= 1.0  # the best checkpoint's text
    assert 0 < run["gen_tokens"] < 150  # as many as the 64-token context holds after a heading
    assert 0.0 < run["gen_text_rep4"] < 0.1 and 0.9 < run["gen_text_distinct_2"] <= 1.0  # WikiText barely repeats
    assert "rep4" in result.stdout and "bound 1.5x" in result.stdout


def test_serve_load_chaos_survives_disconnects_and_malformed_requests(tmp_path):
    """A few seconds of `--chaos`: the server stays up, every well-formed answer equals the reference, every
    malformed request gets its 4xx, abandoned requests leave the engine."""
    import json

    from tests.serve_support import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.ckpt", steps=1)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--ckpt_path", str(ckpt),
                             "--chaos", "--clients", "16", "--duration", "3", "--max_tokens", "8",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert summary["crashes"] == 0 and summary["server_alive_and_healthy"] and summary["unexpected_answers"] == 0
    assert summary["well_formed_correct"] > 0 and summary["malformed_refused"] > 0 and summary["disconnects"] > 0
    assert summary["engine_after"]["active_requests"] == 0


def test_compress_benchmark_prints_every_row(tmp_path):
    """benchmarks/compress.py on a tiny checkpoint: every variant of the README table, plausible columns."""
    import json

    from tests.conftest import make_corpus
    from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint

    tokenizer = tiny_tokenizer()
    teacher = write_checkpoint(tmp_path / "teacher.ckpt", tiny_gpt(tokenizer.vocab_size), tokenizer)
    students = [write_checkpoint(tmp_path / f"{name}.ckpt", tiny_gpt(tokenizer.vocab_size, seed, hidden_size=16), tokenizer)
                for seed, name in enumerate(("distilled", "baseline"))]
    (tmp_path / "test.txt").write_text(make_corpus(3, seed=11), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compress.py"), "--ckpt", str(teacher), "--distilled", str(students[0]),
         "--no_teacher", str(students[1]), "--test_file", str(tmp_path / "test.txt"), "--workdir", str(tmp_path / "work"),
         "--decode_tokens", "4", "--runs", "1", "--max_eval_tokens", "300", "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["fp32", "int8", "pruned unstructured 30%", "pruned unstructured 50%", "pruned structured (MLP channels) 30%",
             "pruned structured (MLP channels) 50%", "distilled student", "student without teacher"]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [line.split("|")[1].strip() for line in table] == names
    rows = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    fp32, int8 = rows["fp32"], rows["int8"]
    assert all(r["tok_s"] > 0 and 1 < r["ppl"] < 10 * tokenizer.vocab_size and r["bpb"] > 0 and r["file_mb"] > 0
               for r in rows.values())
    assert int8["linear_mb"] < fp32["linear_mb"] / 3 and int8["file_mb"] < fp32["file_mb"] / 2
    assert int8["params"] == fp32["params"] and abs(int8["ppl"] / fp32["ppl"] - 1) < 0.05
    for sparsity in (30, 50):
        unstructured, structured = rows[f"pruned unstructured {sparsity}%"], rows[f"pruned structured (MLP channels) {sparsity}%"]
        assert unstructured["params"] == fp32["params"] > unstructured["nonzero"]
        assert structured["params"] < fp32["params"] and structured["file_mb"] < fp32["file_mb"]
    assert rows["distilled student"]["params"] < fp32["params"]


def _tiny_checkpoint_and_headed_text(tmp_path, **model_overrides):
    """A tiny checkpoint and a raw text of twelve " = Heading = " articles (four, each thrice), repetitive: the reference pieces
    repeat 4-grams, so the text's own rep4 is above 0 and a ratio to it means something."""
    from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint

    tokenizer = tiny_tokenizer()
    model = tiny_gpt(tokenizer.vocab_size, max_position_embeddings=64, **model_overrides)
    if model_overrides.get("context_cache"):
        model.context_cache.weight.fill_(0.5)
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", model, tokenizer)
    body = "the river ran by the town . " * 3
    articles = "".join(f" = Heading {i} = \n \n {body}and the mill {i} . \n \n" * 3 for i in range(4))
    (tmp_path / "test.raw").write_text(articles, encoding="utf-8")
    return ckpt, tmp_path / "test.raw"


def test_generation_quality_prints_both_distributions_beside_the_test_text(tmp_path):
    """benchmarks/generation_quality.py on a tiny checkpoint with a context cache: the reference row, the plain
    softmax and the cache's mixture, each with repetition figures and the bpb of the distribution sampled."""
    ckpt, text_file = _tiny_checkpoint_and_headed_text(tmp_path, context_cache=True)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation_quality.py"), str(ckpt),
                             "--text_file", str(text_file), "--prompts", "3", "--seeds", "2",
                             "--max_new_tokens", "24"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line[:52].strip(): line[52:].split() for line in result.stdout.splitlines()
            if line.startswith(("the test text", "plain softmax", "context cache"))}
    assert set(rows) == {"the test text itself (same-length pieces)", "plain softmax, no repetition penalty",
                         "plain softmax, penalty 1.2 (the default)", "context cache as calibrated, no penalty",
                         "context cache as calibrated, penalty 1.2"}
    plain, cached = rows["plain softmax, penalty 1.2 (the default)"], rows["context cache as calibrated, no penalty"]
    assert all(0.0 <= float(x) <= 1.0 for x in plain[:2] + cached[:2])  # greedy may end at once (nan)
    assert float(plain[3]) != float(cached[3])  # each row scores the distribution it sampled
    assert "bound 1.5" in result.stdout


def test_generation_quality_measure_returns_the_figures_of_the_rows_asked_for(tmp_path):
    """`measure`, the function both generation_quality.py and quality.py call: the text's own figures, each row's
    sampled and greedy figures in range, the default's ratio to the text and the bound; bad requests refused."""
    from benchmarks.generation_quality import BOUND, measure
    from lm.errors import LMError
    from lm.io.checkpoints import load_model

    ckpt, text_file = _tiny_checkpoint_and_headed_text(tmp_path)
    model, tokenizer = load_model(ckpt)
    text = text_file.read_text(encoding="utf-8")
    done = []
    figures = measure(model, tokenizer, text, prompts=3, seeds=2, max_new_tokens=32, rows=("plain", "default"),
                      on_row=lambda key, so_far: done.append((key, sorted(so_far["rows"]))))
    assert done == [("plain", ["plain"]), ("default", ["default", "plain"])]  # reported as each row ends
    reference = figures["reference"]
    assert 0.0 < reference["repeated_4gram_share"] < 1.0 and 0.0 < reference["distinct_2"] <= 1.0
    for row in figures["rows"].values():
        assert 0.0 <= row["sampled"]["repeated_4gram_share"] <= 1.0 and 0.0 < row["sampled"]["distinct_2"] <= 1.0
        assert row["example"].startswith(" = Heading 0 = \n \n") and row["seconds"] > 0
    default = figures["rows"]["default"]["sampled"]["repeated_4gram_share"]
    assert figures["rep4_ratio"] == pytest.approx(default / reference["repeated_4gram_share"])
    assert figures["within_bound"] == (figures["rep4_ratio"] <= BOUND)
    without_greedy = measure(model, tokenizer, text, prompts=3, seeds=2, max_new_tokens=32, greedy=False)
    assert without_greedy["rows"]["default"]["greedy"] is None
    assert without_greedy["rows"]["default"]["sampled"] == figures["rows"]["default"]["sampled"]  # seeded
    for bad, message in [(dict(rows=("cache",)), "context_cache: true"), (dict(rows=("nucleus",)), "Unknown rows"),
                         (dict(prompts=13), "fewer than --prompts 13"), (dict(max_new_tokens=10_000), "shorter than one sample")]:
        with pytest.raises(LMError, match=message):
            measure(model, tokenizer, text, **{"prompts": 3, "seeds": 1, "max_new_tokens": 32, **bad})


def test_quality_benchmark_reports_the_generation_figures_of_its_best_checkpoint(tmp_path, monkeypatch, capsys):
    """quality.py's generation step on a tiny checkpoint (no 10-minute fit): the figures per run, in the run's
    printout, in the summary (mean over seeds) and in the JSON; `--gen-prompts 0` skips them; too many
    headings are refused before any training."""
    import json
    import math

    from benchmarks import quality

    ckpt, text_file = _tiny_checkpoint_and_headed_text(tmp_path)
    figures = quality.generation_scores(ckpt, str(text_file), prompts=3, seeds=2, tokens=32)
    assert 0.0 <= figures["gen_rep4"] <= 1.0 and 0.0 < figures["gen_distinct_2"] <= 1.0
    assert math.isnan(figures["gen_greedy_rep4"]) or 0.0 <= figures["gen_greedy_rep4"] <= 1.0  # nan: greedy ended at once
    assert 0.0 < figures["gen_text_rep4"] < 1.0
    assert figures["gen_rep4_ratio"] == pytest.approx(figures["gen_rep4"] / figures["gen_text_rep4"])
    assert figures["gen_within_bound"] == (figures["gen_rep4_ratio"] <= quality.BOUND) and figures["gen_seconds"] > 0
    assert quality.generation_scores(ckpt, str(text_file), prompts=0, seeds=2, tokens=32) == {}
    longer = quality.generation_scores(ckpt, str(text_file), prompts=3, seeds=1, tokens=500)  # beyond the context
    assert 32 < longer["gen_tokens"] < 64 and 0.0 <= longer["gen_rep4"] <= 1.0  # what fits after the heading

    runs = [{"seed": seed, "test_ppl": 100.0, "test_bpb": 2.0, "test_cache_bpb": None, "steps": 1, "tokens_seen": 1,
             "epochs": 1, "fit_seconds": 1.0, "precision": "32-true", "best_checkpoint": str(ckpt), "val_curve": [],
             **figures} for seed in (1, 2)]
    quality.print_run(runs[0])
    args = quality.argparse.Namespace(config="recipe.yaml", seeds=[1, 2], workdir=str(tmp_path), name="g",
                                      gen_prompts=3, gen_seeds=2, gen_tokens=32)
    (tmp_path / "logs").mkdir()
    quality.print_summary(args, runs)
    out = capsys.readouterr().out
    assert f"generation (the default sampling, 32 tokens): rep4 {figures['gen_rep4']:.4f}" in out
    assert "3 headings x 2 seeds x 32 tokens; lm generate's defaults: temperature 0.8" in out and "met in" in out
    saved = json.loads((tmp_path / "logs" / "g_quality.json").read_text())
    assert saved["runs"][0]["gen_distinct_2"] == figures["gen_distinct_2"] and "32 tokens" in saved["generation"]

    monkeypatch.setattr(sys, "argv", ["quality.py", "--test-file", str(text_file), "--gen-prompts", "13"])
    with pytest.raises(SystemExit, match="fewer than --prompts 13"):
        quality.parse_args()


def test_recipe_throughput_times_both_contexts_of_the_default_recipe():
    from tests.helpers import WIKITEXT_DIR

    if not (WIKITEXT_DIR / "wiki.valid.raw").is_file():
        pytest.skip(f"WikiText-2 raw files not found in {WIKITEXT_DIR}")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe_throughput.py"), "--precisions",
                             "32-true", "--steps", "17", "--warmup", "0", "--",  # a smaller network: the loop is the test
                             "--model.config.num_hidden_layers", "1", "--model.config.hidden_size", "64"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| 32-true |")]
    # 10 warm-up steps, then the other 7: step s is at 512 once (s - 10) / 7 >= 0.85, i.e. the last one, step 16.
    assert [(row[2].strip(), row[3].strip()) for row in rows] == [("256", "16"), ("512", "1")]
    for row in rows:
        assert 0 < float(row[8].strip(" *%")) < 100  # of the measured peak
    assert not (ROOT / "checkpoints" / "recipe_throughput_32-true").exists()  # its outputs are not kept


NANOGPT_STAND_IN = '''
# Stands in for nanoGPT's model.py: its interface (GPTConfig fields, GPT(config), forward(idx, targets) -> (logits,
# loss), configure_optimizers), built from lm's GPT for the test.
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from lm.model import GPT as LMGPT, GPTConfig as LMConfig

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.net = LMGPT(LMConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                                  num_attention_heads=config.n_head, max_position_embeddings=config.block_size))

    def forward(self, idx, targets=None):
        logits = self.net(idx)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
'''


def test_vs_nanogpt_runs_both_sides_from_a_checkout_and_says_when_there_is_none(tmp_path):
    (tmp_path / "model.py").write_text(NANOGPT_STAND_IN)
    command = [sys.executable, str(ROOT / "benchmarks" / "vs_nanogpt.py"), "--precisions", "32-true", "--rounds", "1",
               "--steps", "1", "--warmup", "0"]
    result = subprocess.run([*command, "--nanogpt", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line.split("|") for line in result.stdout.splitlines() if line.startswith("| 32-true |"))
    assert float(row[2]) > 0 and float(row[3]) > 0 and row[4].strip().endswith("x**")
    missing = subprocess.run([*command, "--nanogpt", str(tmp_path / "nowhere")], capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
    assert missing.returncode != 0 and "git clone https://github.com/karpathy/nanoGPT" in missing.stderr
