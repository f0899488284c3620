"""The bridge to EleutherAI's lm-evaluation-harness (lm/evaluation/harness.py), offline: task YAMLs written here
(the harness's include_path) over local JSON datasets, a tiny checkpoint, and SST-2 sentences from ../shared/data.

What is checked: the harness's accuracy on a 2-choice task is the one lm's own per-choice log-likelihoods give;
its bits-per-byte / byte and word perplexity of a text equal `lm eval`'s (evaluate_text_file) for the network
and for the context cache's mixture; generate_until is lm's greedy generation cut at the stop string; bad input
is one LMError line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the harness extra is not installed: pip install -e '.[harness]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from lm.commands.eval import evaluate  # noqa: E402
from lm.errors import LMError  # noqa: E402
from lm.evaluation.harness import LMHarnessModel, evaluate_harness  # noqa: E402
from lm.evaluation.perplexity import WindowSpan, evaluate_text_file, score_windows, text_stream  # noqa: E402
from lm.io.checkpoints import load_model  # noqa: E402
from lm.model.generation import generate  # noqa: E402
from tests.conftest import make_corpus  # noqa: E402
from tests.helpers import REPO_ROOT, SHARED_DATA  # noqa: E402
from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint  # noqa: E402

SST2_DEV = SHARED_DATA / "sst2-stsa-binary" / "stsa.binary.dev"
CONTEXT = 64  # short enough that the text spans many windows and long SST-2 prompts are left-truncated
QUESTION = "\nQuestion: Is this sentence positive or negative?\nAnswer:"
CHOICES = ["negative", "positive"]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The datasets library offline, its caches in tmp (the task YAMLs also pass cache_dir: datasets may have
    read these variables already, when another test imported it first)."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain tiny GPT, and one with a context cache whose mixture differs from its softmax (weight 0.3)."""
    folder = tmp_path_factory.mktemp("harness_ckpt")
    tokenizer = tiny_tokenizer()
    cached = tiny_gpt(tokenizer.vocab_size, seed=1, max_position_embeddings=CONTEXT, context_cache=True)
    cached.context_cache.weight.fill_(0.3)
    return {"plain": write_checkpoint(folder / "plain.ckpt", tiny_gpt(tokenizer.vocab_size, max_position_embeddings=CONTEXT),
                                      tokenizer),
            "cache": write_checkpoint(folder / "cache.ckpt", cached, tokenizer)}


def write_task(folder: Path, name: str, rows: list[dict], body: str) -> Path:
    """A task YAML `name` over a local JSON-lines dataset of `rows` (its test split), in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    header = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              f"  cache_dir: {folder / 'datasets_cache'}\ntest_split: test\n")
    (folder / f"{name}.yaml").write_text(header + body, encoding="utf-8")
    return folder


SST2_TASK = f"""output_type: multiple_choice
doc_to_text: "{{{{sentence}}}}{QUESTION.encode('unicode_escape').decode()}"
doc_to_target: label
doc_to_choice: {json.dumps(CHOICES)}
metric_list:
  - metric: acc
"""

ROLLING_TASK = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def sst2_rows(n: int = 40) -> list[dict]:
    if not SST2_DEV.is_file():
        pytest.skip(f"SST-2 is not in {SST2_DEV.parent} (see ../shared/data/sst2-stsa-binary/SOURCES.md)")
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[:n]
    return [{"sentence": line[2:], "label": int(line[0])} for line in lines]


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """lm's own log-likelihood of `continuation` after `context`: one sequence, one forward, no batching; a pair
    longer than the context keeps its last context + 1 tokens."""
    context_ids = tokenizer.encode(context)
    ids = tokenizer.encode(context + continuation)
    assert ids[:len(context_ids)] == context_ids
    n = len(ids) - len(context_ids)
    ids = ids[-(CONTEXT + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, -n:]
    return float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[-n:])[:, None]).sum())


# ---------------------------------------------------------------------------------- multiple choice
def test_harness_accuracy_is_the_one_lm_log_likelihoods_give(tmp_path, checkpoints):
    rows = sst2_rows()
    tasks = write_task(tmp_path / "tasks", "sst2_local", rows, SST2_TASK)
    model, tokenizer = load_model(checkpoints["plain"])
    direct = [[continuation_logprob(model, tokenizer, row["sentence"] + QUESTION, " " + choice) for choice in CHOICES]
              for row in rows]
    expected_acc = sum(int(scores[1] > scores[0]) == row["label"] for scores, row in zip(direct, rows)) / len(rows)
    assert any(len(tokenizer.encode(row["sentence"] + QUESTION)) > CONTEXT for row in rows)  # truncation is exercised

    # Through `lm eval --harness_tasks` (batches of 3: sorted, padded, restored to the harness's order).
    output = tmp_path / "harness.json"
    results = evaluate(ckpt_path=str(checkpoints["plain"]), harness_tasks="sst2_local", harness_include_path=str(tasks),
                       harness_batch_size=3, harness_output=str(output))
    assert results["harness"]["sst2_local"]["acc,none"] == pytest.approx(expected_acc, abs=1e-12)
    assert json.loads(output.read_text())["results"]["sst2_local"]["acc,none"] == pytest.approx(expected_acc, abs=1e-12)

    # Each choice's log-likelihood, as the harness logged it, is lm's own.
    logged = evaluate_harness(model, tokenizer, ["sst2_local"], include_path=str(tasks), batch_size=5,
                              log_samples=True, bootstrap_iters=0)
    samples = sorted(logged["samples"]["sst2_local"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(rows)
    for sample, scores in zip(samples, direct):
        harness_scores = [float(response[0]) for response in sample["filtered_resps"]]
        assert harness_scores == pytest.approx(scores, rel=1e-5, abs=1e-4)


# ---------------------------------------------------------------------------------- rolling perplexity
@pytest.mark.parametrize("distribution", ["network", "context cache"])
def test_rolling_perplexity_equals_lm_eval(tmp_path, checkpoints, distribution):
    cache = distribution == "context cache"
    text = make_corpus(3, seed=7)
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    tasks = write_task(tmp_path / "tasks", "text_local", [{"text": text}], ROLLING_TASK)
    model, tokenizer = load_model(checkpoints["cache"])
    assert len(tokenizer.encode(text)) % CONTEXT, "the last window should be a partial one"

    reference = evaluate_text_file(model, tokenizer, text_file, context_cache=cache)  # what `lm eval` reports
    other = evaluate_text_file(model, tokenizer, text_file, context_cache=not cache)
    assert abs(other["bpb"] - reference["bpb"]) > 1e-3  # the two distributions differ: which one is scored matters
    results = evaluate_harness(model, tokenizer, ["text_local"], include_path=str(tasks), batch_size=4,
                               context_cache=cache, bootstrap_iters=0)["results"]["text_local"]
    assert results["bits_per_byte,none"] == pytest.approx(reference["bpb"], rel=1e-4)
    assert results["byte_perplexity,none"] == pytest.approx(2 ** reference["bpb"], rel=1e-4)
    words = len(re.split(r"\s+", text))  # the harness's word count
    assert results["word_perplexity,none"] == pytest.approx(math.exp(reference["nll"] / words), rel=1e-4)


def test_rolling_full_context_gives_the_last_window_the_most_context(checkpoints):
    """rolling_context="full" (the harness's HF model): the same windows, but the last, partial one sees the
    context's worth of earlier tokens; scored here with lm's own score_windows on that layout."""
    model, tokenizer = load_model(checkpoints["plain"])
    text = make_corpus(2, seed=3)
    stream = torch.tensor([tokenizer.eot_id] + tokenizer.encode(text))
    targets = len(stream) - 1
    assert targets % CONTEXT and targets > 2 * CONTEXT
    last = targets // CONTEXT * CONTEXT  # the first target of the partial window
    spans = [WindowSpan(begin, begin + CONTEXT, 0) for begin in range(0, last, CONTEXT)]
    full_spans = spans + [WindowSpan(targets - CONTEXT, targets, last - (targets - CONTEXT))]
    disjoint_spans = spans + [WindowSpan(last, targets, 0)]
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    for mode, layout in (("full", full_spans), ("disjoint", disjoint_spans)):
        nll, count = score_windows(model, stream, layout)
        assert count == targets
        adapter = LMHarnessModel(model=model, tokenizer=tokenizer, batch_size=2, rolling_context=mode)
        assert adapter.loglikelihood_rolling(request)[0] == pytest.approx(-nll, rel=1e-5), mode


# ---------------------------------------------------------------------------------- generation
def test_generate_until_is_lm_greedy_generation_cut_at_the_stop_string(checkpoints):
    model, tokenizer = load_model(checkpoints["plain"])
    prompts = [" = Article number 3 = \n", "The river was built in", "A small town"]

    def greedy(prompt: str, max_new_tokens: int) -> str:
        ids = tokenizer.encode(prompt)
        out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0,
                       eos_id=tokenizer.eot_id)[0][len(ids):]
        return tokenizer.decode(out).split("<|endoftext|>")[0]

    uncut = [greedy(prompt, 12) for prompt in prompts]
    # A stop string from inside each greedy text (not at its start), so the cut is visible.
    stops = [next(text[i:i + 2] for i in range(1, len(text) - 1) if text.find(text[i:i + 2]) > 0) for text in uncut]
    requests = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), i)
                for i, (prompt, stop) in enumerate(zip(prompts, stops))]
    requests.append(Instance("generate_until", {}, (prompts[0], {"until": ["\n\n"], "max_gen_toks": 5}), 3))
    adapter = LMHarnessModel(model=model, tokenizer=tokenizer, batch_size=2)
    outputs = adapter.generate_until(requests)
    expected = [text.split(stop)[0] for text, stop in zip(uncut, stops)] + [greedy(prompts[0], 5).split("\n\n")[0]]
    assert outputs == expected
    assert all(len(out) < len(text) for out, text in zip(outputs, uncut))

    with pytest.raises(LMError, match="max_gen_toks"):
        adapter.generate_until([Instance("generate_until", {}, ("A", {"until": ["."], "max_gen_toks": CONTEXT}), 0)])


# ---------------------------------------------------------------------------------- entry points, bad input
def test_registered_as_lm_beside_the_harness_models(checkpoints):
    assert get_model("lm") is LMHarnessModel
    assert get_model("hf").__name__ == "HFLM"  # registering ours first must not hide the harness's own models
    with pytest.raises(LMError, match="context cache"):
        LMHarnessModel.create_from_arg_string(f"ckpt_path={checkpoints['plain']},context_cache=True")
    with pytest.raises(LMError, match="Unknown model_args"):
        LMHarnessModel.create_from_arg_string(f"ckpt_path={checkpoints['plain']},contxt=3")
    with pytest.raises(LMError, match="auto"):
        LMHarnessModel.create_from_arg_string(f"ckpt_path={checkpoints['plain']}", {"batch_size": "auto"})


def test_lm_eval_harness_flags_say_what_is_wrong(tmp_path, checkpoints):
    ckpt = str(checkpoints["plain"])
    tasks = write_task(tmp_path / "tasks", "text_local", [{"text": "Some words."}], ROLLING_TASK)
    with pytest.raises(LMError, match="not a folder"):
        evaluate(ckpt_path=ckpt, harness_tasks="text_local", harness_include_path=str(tmp_path / "missing"))
    with pytest.raises(LMError, match="--harness_limit: harness options, given without .* add --harness_tasks"):
        evaluate(ckpt_path=ckpt, text_files=[str(tmp_path / "x.txt")], harness_limit=3)
    with pytest.raises(LMError, match="harness_limit must be a positive"):
        evaluate(ckpt_path=ckpt, harness_tasks="text_local", harness_include_path=str(tasks), harness_limit=0)
    # Without the extra: one line naming it, exit status 2, before the checkpoint is read.
    script = "import sys; sys.modules['lm_eval'] = None; from lm.cli.main import main; main(sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", script, "eval", "--ckpt_path", ckpt, "--harness_tasks", "hellaswag"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "needs the harness extra (lm_eval is not installed): pip install 'lm[harness]'" in out.stderr


@pytest.mark.slow
def test_an_unknown_task_is_named_with_the_closest_ones(tmp_path, checkpoints):
    """Slow: a name the include path lacks is looked up among the harness's ~15k built-in tasks too."""
    tasks = write_task(tmp_path / "tasks", "text_local", [{"text": "Some words."}], ROLLING_TASK)
    with pytest.raises(LMError, match="Unknown harness task 'text_locl' \\(did you mean text_local"):
        evaluate(ckpt_path=str(checkpoints["plain"]), harness_tasks="text_locl", harness_include_path=str(tasks))


@pytest.mark.slow
def test_the_harness_cli_runs_the_lm_model(tmp_path, checkpoints):
    """`python -m lm.evaluation.harness`: lm_eval's own command line (every built-in task indexed) with `lm`."""
    text = make_corpus(1, seed=11)
    tasks = write_task(tmp_path / "tasks", "text_local", [{"text": text}], ROLLING_TASK)
    out = subprocess.run([sys.executable, "-m", "lm.evaluation.harness", "--model", "lm", "--model_args",
                          f"ckpt_path={checkpoints['plain']}", "--tasks", "text_local", "--include_path", str(tasks),
                          "--batch_size", "4", "--output_path", str(tmp_path / "out")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    model, tokenizer = load_model(checkpoints["plain"])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    reference = evaluate_text_file(model, tokenizer, tmp_path / "text.txt")
    assert written["results"]["text_local"]["bits_per_byte,none"] == pytest.approx(reference["bpb"], rel=1e-4)
    assert len(text_stream(tmp_path / "text.txt", tokenizer)[0]) > CONTEXT
