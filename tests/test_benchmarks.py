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
            "--model.config.num_attention_heads", "2", "--model.config.max_position_embeddings", "32",
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


def test_generation_quality_prints_both_distributions_beside_the_test_text(tmp_path):
    """benchmarks/generation_quality.py on a tiny checkpoint with a context cache: the reference row, the plain
    softmax and the cache's mixture, each with repetition figures and the bpb of the distribution sampled."""
    from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint

    tokenizer = tiny_tokenizer()
    model = tiny_gpt(tokenizer.vocab_size, context_cache=True, max_position_embeddings=64)
    model.context_cache.weight.fill_(0.5)
    ckpt = write_checkpoint(tmp_path / "cc.ckpt", model, tokenizer)
    articles = "".join(f" = Heading {i} = \n \n the river ran by the town and the mill {i} . \n \n" * 3 for i in range(4))
    (tmp_path / "test.raw").write_text(articles, encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation_quality.py"), str(ckpt),
                             "--text_file", str(tmp_path / "test.raw"), "--prompts", "3", "--seeds", "2",
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
