"""The bad-input suite: one table of mistakes a new user makes, across every verb and the server.

Each case runs the `lm` entry point in this process (or sends a request to the FastAPI app through
TestClient) and checks: the exit code (2 for an `LMError`) or HTTP status; that the message names
the problem and the fix, in one or two lines, with no traceback; and that no existing file under
logs/, checkpoints/ or the token cache was changed or deleted (every file hashed before and after)
and no checkpoint was written. A tiny model is trained once per module; the broken files each case
needs are made from it.
"""

from __future__ import annotations

import builtins
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from lm.cli.main import main
from tests.conftest import make_corpus, write_corpus_files
from tests.helpers import REPO_ROOT, TINY_MODEL, run_cli_here, tiny_data

TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
WATCHED = ("logs", "checkpoints", "cache")  # folders whose files no bad input may touch


class Payload:
    """A pickled object that would create a file if unpickled: a checkpoint that needs it must be refused
    without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@dataclass
class World:
    root: Path
    data: list[str]
    ckpt: Path

    def __getattr__(self, name: str) -> str:  # w.plain -> "<root>/plain.pt" etc.: the files made below
        return str(self.root / FILES[name])


FILES = {"plain": "plain.pt", "pickled": "pickled.ckpt", "truncated": "truncated.ckpt", "weights": "weights.ckpt",
         "altered": "altered.ckpt", "wrong_tok": "wrong_tokenizer.ckpt", "qk": "qk_norm.ckpt", "marker": "pwned",
         "bad_yaml": "bad.yaml", "unknown_yaml": "unknown.yaml", "empty": "empty.txt", "binary": "binary.bin",
         "latin1": "latin1.txt", "no_text": "no_text.jsonl", "small": "small.txt", "big_corpus": "wiki.train.raw",
         "block_yaml": "block_size.yaml", "dup_yaml": "duplicate_key.yaml", "other_tok": "other_tokenizer.json",
         "int_parquet": "int_text.parquet", "latin1_jsonl": "latin1.jsonl", "a_file": "a_file"}
BUSY = "busy"  # an experiment whose lock another process holds for the whole module
HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `lm fit` of the experiment holds it
os.write(fd, json.dumps({"pid": os.getpid(), "command": "lm fit", "started": time.strftime("%H:%M:%S")}).encode())
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    data = tiny_data(write_corpus_files(root, train_docs=30), root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["fit", "--experiment", "tiny", *TINY_MODEL, *TRAINER, *data])
    world = World(root, data, root / "checkpoints" / "tiny" / "last.ckpt")
    _write_broken_files(world)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root / "checkpoints" / f".{BUSY}.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert holder.stdout.readline().strip() == "held"  # a real second process runs experiment BUSY
    yield world
    holder.stdin.close()
    holder.wait(timeout=60)


def _write_broken_files(w: World) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lm.io.checkpoints import load_model, save_model
    from lm.data.tokenizer import Tokenizer
    from tests.tiny_checkpoint import tiny_gpt

    root = w.root
    torch.save({"weights": torch.zeros(3)}, root / FILES["plain"])
    torch.save({"state_dict": {}, "payload": Payload(root / FILES["marker"])}, root / FILES["pickled"])
    data = w.ckpt.read_bytes()
    (root / FILES["truncated"]).write_bytes(data[: len(data) // 2])
    model, tokenizer = load_model(w.ckpt)
    save_model(root / FILES["weights"], model, tokenizer)
    checkpoint = torch.load(w.ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["config"]["hidden_size"] = 64  # weights of 32 under a config of 64
    torch.save(checkpoint, root / FILES["altered"])
    save_model(root / FILES["wrong_tok"], model, Tokenizer.train([make_corpus(30, 0)], vocab_size=400))
    save_model(root / FILES["qk"], tiny_gpt(tokenizer.vocab_size, qk_norm=True), tokenizer)
    (root / FILES["bad_yaml"]).write_text("model:\n  config: {hidden_size: 32\n")
    (root / FILES["unknown_yaml"]).write_text("model:\n  config:\n    hiden_size: 32\n")
    (root / FILES["block_yaml"]).write_text("data:\n  block_size: 64\n")  # the context, on the wrong side
    (root / FILES["empty"]).write_text("")
    (root / FILES["binary"]).write_bytes(bytes(range(256)) * 8)
    (root / FILES["latin1"]).write_bytes("Un caf\u00e9 au lait.\n".encode("latin-1") * 50)
    (root / FILES["no_text"]).write_text('{"body": "a document"}\n{"body": "another"}\n')
    (root / FILES["small"]).write_text("A tiny corpus.\n")
    (root / FILES["dup_yaml"]).write_text("model:\n  config:\n    hidden_size: 32\n    hidden_size: 64\n")
    Tokenizer.train([make_corpus(30, 3)], vocab_size=280).save(root / FILES["other_tok"])
    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), root / FILES["int_parquet"])
    (root / FILES["latin1_jsonl"]).write_bytes('{"text": "Un caf\u00e9"}\n'.encode("latin-1"))
    (root / FILES["a_file"]).write_text("a file where a folder is expected\n")
    (root / "logs" / "blocked").write_text("a file where the log folder of experiment 'blocked' goes\n")


@dataclass
class Case:
    name: str
    expect: int  # exit code (2: LMError) or HTTP status
    problem: str  # text naming what is wrong
    fix: str  # text naming what to do
    argv: Optional[Callable[[World], list[str]]] = None  # an `lm` command, run in-process
    request: Optional[tuple[str, str, dict[str, Any]]] = None  # (method, path, httpx keyword arguments)


def cli(name: str, problem: str, fix: str, argv: Callable[[World], list[str]], expect: int = 2) -> Case:
    return Case(name, expect, problem, fix, argv=argv)


def http(name: str, status: int, problem: str, fix: str, method: str, path: str, **kwargs: Any) -> Case:
    return Case(name, status, problem, fix, request=(method, path, kwargs))


def fit(w: World, *args: str) -> list[str]:
    return ["fit", "--experiment", "again", *TINY_MODEL, *TRAINER, *w.data, *args]


def data_flags(w: World, train: str) -> list[str]:
    return ["--data.train_files", f"[{train}]", "--data.val_files", "null", "--data.test_files", "null",
            "--data.vocab_size", "300", "--data.cache_dir", str(w.root / "cache")]


def without_vocab_size(data: list[str]) -> list[str]:
    at = data.index("--data.vocab_size") if "--data.vocab_size" in data else len(data)
    return data[:at] + data[at + 2:]


def gen(w: World, *args: str, ckpt: Optional[str] = None) -> list[str]:
    return ["generate", "--ckpt_path", ckpt or str(w.ckpt), *args]


LONG = "The river was built in the north of England . " * 20
CASES = [
    # ---- configuration (lm fit)
    cli("unknown key", "model.config.hiden_size", "did you mean model.config.hidden_size",
        lambda w: fit(w, "--model.config.hiden_size", "3")),
    cli("unknown key in YAML", "model.config.hiden_size", "Valid keys of model.config",
        lambda w: fit(w, "--config", w.unknown_yaml)),
    cli("unknown top-level key", "Unknown option foo", "Valid keys at the top level", lambda w: fit(w, "--foo", "1")),
    cli("wrong type", "data.batch_size", "int", lambda w: fit(w, "--data.batch_size", "many")),
    cli("not a choice", "model.config.position", "one of 'learned', 'sinusoidal', 'rope'",
        lambda w: fit(w, "--model.config.position", "bogus")),
    cli("impossible dimensions", "num_attention_heads=5 does not divide hidden_size=32", "Pick a divisor",
        lambda w: fit(w, "--model.config.num_attention_heads", "5")),
    cli("negative learning rate", "learning_rate must be positive", "--model.learning_rate 1e-3",
        lambda w: fit(w, "--model.learning_rate", "-0.1")),
    cli("block size given: the context sets it", "data.block_size is set on the command line",
        "as model.config.max_position_embeddings (e.g. --model.config.max_position_embeddings 64)",
        lambda w: fit(w, "--data.block_size", "64")),
    cli("block size given in YAML", "block_size.yaml, but lm cuts its windows at the model's context",
        "--model.config.max_position_embeddings 64", lambda w: fit(w, "--config", w.block_yaml)),
    cli("block size given to validate", "data.block_size is set on the command line", "max_position_embeddings",
        lambda w: ["validate", "--ckpt_path", str(w.ckpt), *w.data, "--data.block_size", "16"]),
    cli("YAML syntax error", "bad.yaml: YAML syntax error at line 3", "Fix the file",
        lambda w: fit(w, "--config", w.bad_yaml)),
    cli("missing config file", "nope.yaml", "Check the path", lambda w: fit(w, "--config", "nope.yaml")),
    cli("negative max_steps", "max_steps", "non-negative", lambda w: fit(w, "--trainer.max_steps", "-5")),
    cli("unknown model class", "nope.Model", "PYTHONPATH", lambda w: fit(w, "--model", "nope.Model")),
    cli("empty experiment name", "--experiment is empty", "--experiment my_run",
        lambda w: fit(w, "--experiment", "")),
    cli("reused experiment name", "already holds checkpoints", "--ckpt_path last",
        lambda w: fit(w, "--experiment", "tiny")),
    cli("experiment name escaping logs/", "outside logs/", "plain name", lambda w: fit(w, "--experiment", "../up")),
    cli("a key given twice in YAML", "duplicate_key.yaml: the key model.config.hidden_size is given twice, at lines 3 "
        "and 4", "Keep one of them", lambda w: fit(w, "--config", w.dup_yaml)),  # was: the last one, silently
    cli("a second run of a running experiment", f"Experiment '{BUSY}' is in use by another run (lm fit, pid",
        "give this one another --experiment name", lambda w: fit(w, "--experiment", BUSY)),  # was: both ran
    cli("validate while the experiment runs", f"Experiment '{BUSY}' is in use", "another --experiment name",
        lambda w: ["validate", "--experiment", BUSY, "--ckpt_path", str(w.ckpt), *TRAINER[:4], *w.data]),
    cli("resume: an architecture option the checkpoint overrides", "--model.config.hidden_size 64 is given, but the "
        "checkpoint checkpoints/tiny/last.ckpt was trained with 32", "Drop it",
        lambda w: fit(w, "--experiment", "tiny", "--ckpt_path", "last", "--model.config.hidden_size", "64")),
    cli("resume with another vocabulary", "data.vocab_size is 400 on the command line, but the checkpoint",
        "Pass --data.vocab_size 300", lambda w: fit(w, "--experiment", "tiny", "--ckpt_path", "last",
                                                    "--data.vocab_size", "400")),  # was: a state_dict traceback
    cli("resume a mistyped experiment", "--ckpt_path last: checkpoints/tinyy/ does not exist", "Experiments with a "
        "last.ckpt in checkpoints/: tiny. Check --experiment", lambda w: fit(w, "--experiment", "tinyy", "--ckpt_path",
                                                                             "last")),  # was: trained from scratch
    cli("context longer than the corpus (the data report stays)", "too few for block_size=32768",
        "smaller --model.config.max_position_embeddings",  # was: the run rewrote .cache/lm/reports/<key>.json
        lambda w: fit(w, "--model.config.max_position_embeddings", "32768")),
    # ---- data
    cli("missing data file", "nope.txt", "--data.train_files", lambda w: ["prepare", *data_flags(w, "nope.txt")]),
    cli("empty file", "empty.txt is empty", "remove it", lambda w: ["prepare", *data_flags(w, w.empty)]),
    cli("binary file", "binary", "text", lambda w: ["prepare", *data_flags(w, w.binary)]),
    cli("invalid UTF-8", "not valid UTF-8", "Convert it to UTF-8", lambda w: ["prepare", *data_flags(w, w.latin1)]),
    cli("JSONL without the text field", "no 'text' field", "--data.text_field",
        lambda w: ["prepare", *data_flags(w, w.no_text)]),
    cli("corpus smaller than one block", "too few for block_size=32", "smaller --model.config.max_position_embeddings",
        lambda w: fit(w, "--data.train_files", f"[{w.small}]")),
    cli("vocabulary too small", "vocab_size=100", "at least 257",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.vocab_size", "100"]),
    cli("prepare: block size given", "data.block_size is set on the command line", "model.config.max_position_embeddings",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.block_size", "64"]),
    cli("prepare: unknown option", "data.vocab_sise", "did you mean data.vocab_size",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.vocab_sise", "300"]),
    cli("prepare: a nested key given at the top", "Unknown option vocab_size", "did you mean data.vocab_size?",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--vocab_size", "300"]),
    cli("prepare: an abbreviated key", "Unknown option data.vocab", "did you mean data.vocab_size?",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.vocab", "300"]),
    cli("prepare: a recipe file without --config", "Unexpected value", "`lm prepare --config experiments/x.yaml`",
        lambda w: ["prepare", "experiments/x.yaml"]),
    cli("Parquet text column of integers", "column 'text' holds int64 values, not text",
        "--data.text_field to a column of strings ('body')", lambda w: ["prepare", *data_flags(w, w.int_parquet)]),
    cli("JSONL not in UTF-8", "latin1.jsonl is not valid UTF-8 text", "Convert it to UTF-8",
        lambda w: ["prepare", *data_flags(w, w.latin1_jsonl)]),
    cli("cache_dir is a file", "The data cache folder a_file cannot be created: a_file is a file", "--data.cache_dir DIR",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.cache_dir", FILES["a_file"]]),
    cli("litdata_dir is a file", "The LitData folder a_file cannot be created", "--data.litdata_dir DIR",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.loader", "litdata", "--data.litdata_dir",
                   FILES["a_file"]]),
    cli("tokenizer_path of a file that is no tokenizer.json", "last.ckpt is not a tokenizer.json (not UTF-8 text",
        "Pass the tokenizer.json", lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.tokenizer_path",
                                              str(w.ckpt)]),  # was: a UnicodeDecodeError traceback
    cli("predict: a prompts file not in UTF-8", "prompts_file latin1.txt is not valid UTF-8 text", "Convert it to UTF-8",
        lambda w: ["predict", "--ckpt_path", str(w.ckpt), *TRAINER[:4], *w.data, "--data.prompts_file", FILES["latin1"]]),
    cli("cleaning steps under clean: false", "data.clean is false", "--data.clean true",
        lambda w: ["prepare", *data_flags(w, w.big_corpus), "--data.clean", "false", "--data.cleaning.redact_pii",
                   "true"]),
    # ---- checkpoints
    cli("validate without a checkpoint", "needs --ckpt_path", "--random_weights true",
        lambda w: ["validate", *TRAINER[:4], *w.data]),
    cli("test without a checkpoint", "needs --ckpt_path", "--random_weights true", lambda w: ["test", *TRAINER[:4], *w.data]),
    cli("predict without a checkpoint", "needs --ckpt_path", "--random_weights true",
        lambda w: ["predict", *TRAINER[:4], *w.data, "--data.prompts", "[The river]"]),
    cli("folder as checkpoint", "is a folder, not a checkpoint file", "last.ckpt",
        lambda w: ["test", "--ckpt_path", str(w.ckpt.parent), *TRAINER[:4], *w.data]),
    cli("missing checkpoint", "Checkpoint not found", "checkpoints/<experiment>/",
        lambda w: ["validate", "--ckpt_path", "missing.ckpt", *TRAINER[:4], *w.data]),
    cli("plain torch dict to validate", "not a checkpoint written by `lm fit`", "checkpoints/<experiment>/",
        lambda w: ["validate", "--ckpt_path", w.plain, *TRAINER[:4], *w.data]),
    cli("weights-only checkpoint to validate", "holds weights only", "lm eval",
        lambda w: ["validate", "--ckpt_path", w.weights, *TRAINER[:4], *w.data]),
    cli("pickled objects (validate)", "pickled Python objects", "Re-save the weights",
        lambda w: ["validate", "--ckpt_path", w.pickled, *TRAINER[:4], *w.data]),
    cli("pickled objects (resume)", "pickled Python objects", "Re-save the weights",
        lambda w: fit(w, "--ckpt_path", w.pickled)),
    cli("pickled objects (generate)", "pickled Python objects", "Re-save the weights",
        lambda w: gen(w, "--prompt", "x", ckpt=w.pickled)),
    cli("pickled objects (serve)", "pickled Python objects", "Re-save the weights",
        lambda w: ["serve", "--ckpt_path", w.pickled, "--feedback_path", "null"]),
    cli("truncated checkpoint", "truncated, corrupt", "copy it again", lambda w: gen(w, "--prompt", "x", ckpt=w.truncated)),
    cli("weights not of their config", "do not fit its own model config", "unmodified checkpoint",
        lambda w: gen(w, "--prompt", "x", ckpt=w.altered)),
    cli("tokenizer of another vocabulary", "its tokenizer has", "as `lm fit` wrote it",
        lambda w: ["eval", "--ckpt_path", w.wrong_tok, "--text_files", f"[{w.small}]"]),
    cli("validate with the default vocabulary", "data.vocab_size is 8192 (its default), but the checkpoint",
        "Pass --data.vocab_size 300.", lambda w: ["validate", "--ckpt_path", str(w.ckpt), *TRAINER[:4],
                                                   *without_vocab_size(w.data)]),  # was: a state_dict traceback
    cli("validate with another tokenizer file", "data.tokenizer_path other_tokenizer.json is not the tokenizer this "
        "model was trained with", "Drop --data.tokenizer_path",  # was: ignored silently
        lambda w: ["validate", "--ckpt_path", str(w.ckpt), *TRAINER[:4], *w.data, "--data.tokenizer_path",
                   FILES["other_tok"]]),
    cli("validate --ckpt_path last of a mistyped experiment", "checkpoints/tinyy/ does not exist (experiment 'tinyy'), so "
        "lm validate would run random weights", "Check --experiment, or pass --ckpt_path FILE",
        lambda w: ["validate", "--experiment", "tinyy", "--ckpt_path", "last", *TRAINER[:4], *w.data]),
    cli("predict into a log folder that is a file", "The log folder logs/blocked cannot be created: logs/blocked is a "
        "file", "Move or rename that file", lambda w: ["predict", "--experiment", "blocked", "--ckpt_path", str(w.ckpt),
                                                       *TRAINER[:4], *w.data, "--data.prompts", "[The river]"]),
    cli("weights_only false", "--weights_only false is refused", "Leave the option out",
        lambda w: ["validate", "--ckpt_path", str(w.ckpt), "--weights_only", "false", *TRAINER[:4], *w.data]),
    # ---- generation
    cli("empty prompt", "Empty prompt", "at least one token", lambda w: gen(w, "--prompt", "")),
    cli("prompt longer than the context", "longer than the model's context", "--truncate true",
        lambda w: gen(w, "--prompt", LONG, "--max_new_tokens", "8")),
    cli("max_new_tokens beyond the context", "max_new_tokens=500 leaves no room", "--max_new_tokens",
        lambda w: gen(w, "--prompt", "The river", "--max_new_tokens", "500")),
    cli("negative max_new_tokens", "max_new_tokens must be >= 0", "-3",
        lambda w: gen(w, "--prompt", "x", "--max_new_tokens", "-3")),
    cli("top_p above 1", "top_p must be in (0, 1]", "1.5", lambda w: gen(w, "--prompt", "x", "--top_p", "1.5")),
    cli("top_p of 0", "top_p must be in (0, 1]", "got 0.0", lambda w: gen(w, "--prompt", "x", "--top_p", "0")),
    cli("cuda without a GPU", "no cuda device", "--device cpu", lambda w: gen(w, "--prompt", "x", "--device", "cuda")),
    cli("generate: unknown option", "Unknown option colour", "Valid keys", lambda w: gen(w, "--prompt", "x", "--colour", "1")),
    cli("generate: misspelled sampling flag", "Unknown option temprature", "did you mean sampling.temperature?",
        lambda w: gen(w, "--prompt", "x", "--temprature", "0")),
    cli("generate: abbreviated flag", "Unknown option temp", "did you mean template or sampling.temperature?",
        lambda w: gen(w, "--prompt", "x", "--temp", "0")),  # was read as --template 0
    cli("generate: checkpoint without its flag", "Unexpected value", "--ckpt_path checkpoints/tiny/last.ckpt",
        lambda w: ["generate", "checkpoints/tiny/last.ckpt", "--prompt", "x"]),
    cli("missing prompts file", "Prompts file not found", "nope.txt", lambda w: gen(w, "--prompts_file", "nope.txt")),
    # ---- evaluation, reports, planning, fine-tuning
    cli("eval: nothing to evaluate", "Nothing to evaluate", "--text_files", lambda w: ["eval", "--ckpt_path", str(w.ckpt)]),
    cli("eval: stride 0", "--stride must be a positive number", "or left out",
        lambda w: ["eval", "--ckpt_path", str(w.ckpt), "--text_files", f"[{w.root / FILES['small']}]", "--stride", "0"]),
    cli("generate: seed beyond 64 bits", "seed must be an integer in [0, 2^63)", "64-bit seeds",
        lambda w: gen(w, "--prompt", "x", "--seed", str(2**64))),
    cli("eval: missing text file", "Text file not found", "--text_files",
        lambda w: ["eval", "--ckpt_path", str(w.ckpt), "--text_files", "[nope.txt]"]),
    cli("report: not a run folder", "Run folder not found", "logs/<experiment>/version_N",
        lambda w: ["report", "logs/nope", "--output", "reports/x"]),
    cli("report: runs given as --runs", "Unknown option runs: runs is a positional argument",
        "`lm report logs/tiny`. Valid keys at the top level: output.", lambda w: ["report", "--runs", "logs/tiny"]),
    cli("report: several runs given as --runs", "runs is a positional argument",
        "`lm report logs/a logs/b --output reports/x`",
        lambda w: ["report", "--runs", "logs/a", "logs/b", "--output", "reports/x"]),
    cli("report: runs given as --runs=[list]", "runs is a positional argument", "`lm report logs/a logs/b`",
        lambda w: ["report", "--runs=[logs/a, logs/b]"]),
    cli("report: near miss of runs", "Unknown option run: runs is a positional argument", "`lm report logs/tiny`",
        lambda w: ["report", "--run", "logs/tiny"]),
    cli("report: misspelled option", "Unknown option outptu (did you mean output?)",
        "Valid keys at the top level: output.", lambda w: ["report", "logs/tiny", "--outptu", "reports/x"]),
    cli("report: --output under a file", "The report folder a_file/report cannot be created: a_file is a file",
        "--output DIR", lambda w: ["report", "logs/tiny", "--output", f"{FILES['a_file']}/report"]),  # was: a traceback
    cli("eval: near miss of text_files", "Unknown option text_file", "did you mean text_files?",
        lambda w: ["eval", "--ckpt_path", str(w.ckpt), "--text_file", w.small]),
    cli("eval: misspelled option", "Unknown option strid", "did you mean stride?",
        lambda w: ["eval", "--ckpt_path", str(w.ckpt), "--text_files", f"[{w.small}]", "--strid", "8"]),
    cli("plan: unknown device kind", "Unknown device kind 'tpu'", "known kinds", lambda w: ["plan", *fit(w)[1:], "--device_kind", "tpu"]),
    cli("plan: unknown key in the recipe", "model.config.hiden_size", "did you mean model.config.hidden_size",
        lambda w: ["plan", *fit(w)[1:], "--model.config.hiden_size", "3", "--device_kind", "h100"]),
    cli("plan: MFU above 1", "mfu is a fraction", "0.4", lambda w: ["plan", *fit(w)[1:], "--mfu", "2"]),
    cli("plan: misspelled own option", "Unknown option device_knd", "did you mean device_kind?",
        lambda w: ["plan", *fit(w)[1:], "--device_knd", "h100"]),
    cli("plan: near miss of own options", "Unknown option device", "did you mean devices or device_kind?",
        lambda w: ["plan", *fit(w)[1:], "--device", "cpu"]),
    cli("fit: a second EMA on a recipe that has one", "2 weight-averaging callbacks", "drop the extra overlay",
        lambda w: ["fit", "--config", str(REPO_ROOT / "experiments/wikitext2_cpu.yaml"), "--config",
                   str(REPO_ROOT / "experiments/trainer/callbacks/ema.yaml"), "--experiment", "two_ema"]),
    cli("finetune: unknown verb", "usage: lm finetune", "fit,validate,test", lambda w: ["finetune", "train"]),
    cli("finetune: missing backbone", "Checkpoint not found: nope.ckpt", "checkpoints/<experiment>/",
        lambda w: ["finetune", "fit", "--config", str(REPO_ROOT / "experiments/finetune/sst2.yaml"), "--model.init_args.backbone", "nope.ckpt"]),
    # ---- compression and export
    cli("prune: sparsity above 1", "sparsity must be a fraction in (0, 1)", "0.3",
        lambda w: ["prune", "--ckpt_path", str(w.ckpt), "--output", "pruned.ckpt", "--sparsity", "1.5"]),
    cli("prune: unsupported method", "attention heads is not supported", "--method mlp_channels",
        lambda w: ["prune", "--ckpt_path", str(w.ckpt), "--output", "pruned.ckpt", "--method", "heads"]),
    cli("quantize under a file", "Cannot write a_file/q.ckpt: a_file is a file, not a folder", "write elsewhere",
        lambda w: ["quantize", "--ckpt_path", str(w.ckpt), "--output", f"{FILES['a_file']}/q.ckpt"]),
    cli("quantize onto its input", "is the input checkpoint", "new file",
        lambda w: ["quantize", "--ckpt_path", str(w.ckpt), "--output", str(w.ckpt)]),
    cli("export: unknown format", "format", "one of 'safetensors', 'hf', 'onnx'",
        lambda w: ["export", "--ckpt_path", str(w.ckpt), "--output", "exported", "--format", "bogus"]),
    cli("merge: not a fine-tuning checkpoint", "not an instruction-tuning checkpoint", "use it as it is",
        lambda w: ["merge", "--ckpt_path", str(w.ckpt), "--output", "merged.ckpt"]),
    cli("merge: misspelled option", "Unknown option outpt", "did you mean output?",
        lambda w: ["merge", "--ckpt_path", str(w.ckpt), "--outpt", "merged.ckpt"]),
    cli("merge: abbreviated option", "Unknown option ckpt", "did you mean ckpt_path?",
        lambda w: ["merge", "--ckpt", str(w.ckpt), "--output", "merged.ckpt"]),
    cli("export: misspelled option", "Unknown option formt", "did you mean format?",
        lambda w: ["export", "--ckpt_path", str(w.ckpt), "--output", "exported", "--formt", "hf"]),
    cli("export: abbreviated option", "Unknown option out", "did you mean output?",
        lambda w: ["export", "--ckpt_path", str(w.ckpt), "--out", "exported"]),
    cli("quantize: misspelled option", "Unknown option outptu", "did you mean output?",
        lambda w: ["quantize", "--ckpt_path", str(w.ckpt), "--outptu", "q.ckpt"]),
    cli("quantize: checkpoint without its flag", "Unexpected value", "--ckpt_path",
        lambda w: ["quantize", str(w.ckpt), "--output", "q.ckpt"]),
    cli("prune: misspelled option", "Unknown option sparsty", "did you mean sparsity?",
        lambda w: ["prune", "--ckpt_path", str(w.ckpt), "--output", "pruned.ckpt", "--sparsty", "0.3"]),
    cli("prune: near miss", "Unknown option sparse", "did you mean sparsity?",
        lambda w: ["prune", "--ckpt_path", str(w.ckpt), "--output", "pruned.ckpt", "--sparse", "0.3"]),
    # (the refused checkpoint: should parsing ever accept these flags, serve stops there instead of serving)
    cli("serve: misspelled option", "Unknown option prot", "did you mean port?",
        lambda w: ["serve", "--ckpt_path", w.pickled, "--prot", "9000"]),
    cli("serve: abbreviated option", "Unknown option max_token", "did you mean max_tokens?",
        lambda w: ["serve", "--ckpt_path", w.pickled, "--max_token", "9"]),  # was read as --max_tokens, silently
    # (the pickled checkpoint again: the feedback file is checked first, before any model is loaded)
    cli("serve: feedback file under a file", "folder of --feedback_path a_file cannot be created: a_file is a file",
        "--feedback_path null to turn feedback off", lambda w: ["serve", "--ckpt_path", w.pickled, "--feedback_path",
                                                                f"{FILES['a_file']}/feedback.jsonl"]),
    cli("serve: feedback file is a folder", "--feedback_path logs is a folder", "--feedback_path logs/feedback.jsonl",
        lambda w: ["serve", "--ckpt_path", w.pickled, "--feedback_path", "logs"]),
    cli("serve: feedback folder not writable", "folder of --feedback_path /sys/lm-feedback is not writable",
        "--feedback_path FILE", lambda w: ["serve", "--ckpt_path", w.pickled, "--feedback_path",
                                           "/sys/lm-feedback/feedback.jsonl"]),  # sysfs: refused even to root
    # ---- the server (FastAPI app through TestClient)
    http("malformed JSON", 400, "not valid JSON", "JSON object", "POST", "/v1/completions",
         content=b'{"prompt": "x",', headers={"content-type": "application/json"}),
    http("prompt of the wrong type", 400, "prompt", "valid string", "POST", "/v1/completions", json={"prompt": 5}),
    http("max_tokens of the wrong type", 400, "max_tokens", "valid integer", "POST", "/v1/completions",
         json={"prompt": "x", "max_tokens": "many"}),
    http("missing prompt", 400, "prompt", "Field required", "POST", "/v1/completions", json={"max_tokens": 3}),
    http("huge body", 413, "body", "bytes", "POST", "/v1/completions", content=b'{"prompt": "' + b"x" * 20_000 + b'"}',
         headers={"content-type": "application/json"}),
    http("temperature above 2", 400, "temperature", "less than or equal to 2", "POST", "/v1/completions",
         json={"prompt": "x", "temperature": 5}),
    http("top_p of 0", 400, "top_p", "greater than 0", "POST", "/v1/completions", json={"prompt": "x", "top_p": 0}),
    # JSON's types are the schema's: true is not a number, "0.5" is not one either (both were taken as 1.0 / 0.5)
    http("top_p a boolean", 400, "top_p", "valid number", "POST", "/v1/completions", json={"prompt": "x", "top_p": True}),
    http("temperature a string", 400, "temperature", "valid number", "POST", "/v1/completions",
         json={"prompt": "x", "temperature": "0.5"}),
    http("negative max_tokens", 400, "max_tokens", "greater than or equal to 1", "POST", "/v1/completions",
         json={"prompt": "x", "max_tokens": -1}),
    http("max_tokens beyond the context", 400, "max_tokens", "at most", "POST", "/v1/completions",
         json={"prompt": "The river", "max_tokens": 31}),
    http("empty prompt", 400, "prompt is empty", "at least one character", "POST", "/v1/completions", json={"prompt": ""}),
    http("unknown model", 404, "'gpt-4' is not served here", "GET /v1/models", "POST", "/v1/completions",
         json={"prompt": "x", "model": "gpt-4"}),
    http("a path as the model", 404, "is not served here", "GET /v1/models", "POST", "/v1/chat/completions",
         json={"messages": [{"role": "user", "content": "hi"}], "model": "checkpoints/tiny/last.ckpt"}),
    http("unknown chat role", 400, "role", "'system', 'user' or 'assistant'", "POST", "/v1/chat/completions",
         json={"messages": [{"role": "robot", "content": "hi"}]}),
    http("too many stop strings", 400, "At most 4 stop sequences", "got 5", "POST", "/v1/completions",
         json={"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
    http("logprobs asked for", 400, "logprobs=2 asks for token log-probabilities", "Leave logprobs out", "POST",
         "/v1/completions", json={"prompt": "x", "logprobs": 2}),  # was: ignored
    http("echo asked for", 400, "echo=true asks for the prompt echoed", "Leave echo out", "POST", "/v1/completions",
         json={"prompt": "x", "echo": True}),
    http("chat logprobs asked for", 400, "logprobs=true", "Leave logprobs out", "POST", "/v1/chat/completions",
         json={"messages": [{"role": "user", "content": "hi"}], "logprobs": True}),
    http("an OpenAI penalty asked for", 400, "presence_penalty=0.5 asks for OpenAI's presence penalty",
         "Leave presence_penalty out (or send null, 0)", "POST", "/v1/completions",
         json={"prompt": "x", "presence_penalty": 0.5}),
    http("JSON output asked for", 400, "response_format={\"type\": \"json_object\"}", "Leave response_format out",
         "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                               "response_format": {"type": "json_object"}}),
    http("unknown field", 400, "Unknown field 'max_token' (did you mean max_tokens?)", "it would be ignored, so it is "
         "refused", "POST", "/v1/completions", json={"prompt": "x", "max_token": 3}),  # was: ignored
    http("unknown field in a chat message", 400, "Unknown field 'messages.0.nmae' (did you mean name?)",
         "Fields: content, name, role", "POST", "/v1/chat/completions",
         json={"messages": [{"role": "user", "content": "hi", "nmae": "bob"}]}),
    http("feedback for an unknown response", 404, "No recent response", "keeps the last", "POST", "/v1/feedback",
         json={"id": "cmpl-nope", "rating": "up"}),
    # ---- found by fuzzing the API (tests/test_serve_fuzz.py); the first three were FastAPI's {"detail": ...}
    http("unknown path", 404, "Not found: GET /v1/complete", "endpoints: POST /v1/completions", "GET", "/v1/complete"),
    http("wrong method", 405, "GET is not allowed on /v1/completions", "use POST", "GET", "/v1/completions"),
    http("body not UTF-8", 400, "the body is not UTF-8 text", "send one UTF-8 JSON object", "POST", "/v1/completions",
         content=b'{"prompt": "caf\xe9"}', headers={"content-type": "application/json"}),
    http("JSON sent as form data", 400, "the body was sent as application/x-www-form-urlencoded, not as JSON",
         "'Content-Type: application/json'", "POST", "/v1/completions",  # curl -d without -H; was: "valid dictionary"
         content=b'{"prompt": "x"}', headers={"content-type": "application/x-www-form-urlencoded"}),
    http("a lone surrogate in a chat message", 400, "not valid Unicode: surrogates not allowed, in a message's content",
         "Send UTF-8 text", "POST", "/v1/chat/completions",  # was: an offset into the chat template, as param prompt
         content=b'{"messages": [{"role": "user", "content": "a\\udc00"}]}', headers={"content-type": "application/json"}),
]


def test_the_suite_covers_every_verb_and_the_server():
    verbs = {case.argv(World(Path("/w"), [], Path("/w/c")))[0] for case in CASES if case.argv}
    assert {"fit", "validate", "test", "predict", "generate", "prepare", "eval", "report", "quantize", "prune",
            "export", "plan", "merge", "finetune", "serve"} <= verbs
    assert len(CASES) >= 40 and sum(case.request is not None for case in CASES) >= 10


@pytest.fixture(scope="module")
def client(world):
    from fastapi.testclient import TestClient

    from lm.commands.serve import build_state
    from lm.serve.app import create_app

    state = build_state(str(world.ckpt), max_body_bytes=4096, model_name="tiny/last")
    state.engine.start()
    try:
        with TestClient(create_app(state)) as test_client:
            yield test_client
    finally:
        state.engine.stop()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, world: World, request, monkeypatch):
    monkeypatch.chdir(world.root)
    monkeypatch.delenv("LM_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["lm"])  # as from a shell: LightningCLI warns when given args and sys.argv has more
    before = _snapshot(world.root)
    if case.argv is not None:
        code, output = run_cli_here(case.argv(world))
        message = _error_message(output)
    else:
        method, path, kwargs = case.request
        response = request.getfixturevalue("client").request(method, path, **kwargs)
        code, output = response.status_code, response.text
        message = response.json()["error"]["message"]
    assert code == case.expect, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert case.problem in message and case.fix in message, message
    assert message.strip().count("\n") <= 1, message
    after = _snapshot(world.root)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"existing files changed or deleted: {changed}"
    assert not [path for path in after.keys() - before.keys() if path.startswith("checkpoints")], "a checkpoint was written"
    assert not (world.root / FILES["marker"]).exists(), "a pickled object was executed"


def _error_message(output: str) -> str:
    """The message `lm` printed for an LMError: from "error: " to the LM_DEBUG hint."""
    marker = ": error: "
    if marker not in output:
        return ""
    return output.split(marker, 1)[1].split("(set LM_DEBUG=1", 1)[0].strip()


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under the watched folders, but lock files (`*.lock`: who runs an experiment or
    builds a cache entry, rewritten by each process that takes the lock; never an output)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in WATCHED for path in sorted((root / folder).rglob("*"))
            if path.is_file() and path.suffix != ".lock"}


def test_the_server_never_loads_a_path_from_a_request(world, client, monkeypatch):
    """Requests naming checkpoint files (as the model, in unknown fields, in the query) are answered without
    any file being loaded: the only model is the one `lm serve` loaded at start."""
    import lm.io.checkpoints

    loads: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(str(a[:1])) or real_load(*a, **k))
    monkeypatch.setattr(lm.io.checkpoints, "read_checkpoint", lambda path: loads.append(str(path)))
    other = str(world.root / FILES["weights"])
    bodies = [{"prompt": "x", "model": other}, {"prompt": "x", "model": "../" + other},
              {"prompt": "x", "ckpt_path": other, "max_tokens": 2}, {"prompt": FILES["weights"], "max_tokens": 2}]
    statuses = [client.post(f"/v1/completions?ckpt_path={other}", json=body).status_code for body in bodies]
    assert statuses == [404, 404, 400, 200] and loads == []  # an unknown field (ckpt_path) is refused, unread
    sources = "".join(p.read_text() for p in (REPO_ROOT / "lm" / "serve").glob("*.py"))
    assert "lm.io.checkpoints" not in sources and "torch.load" not in sources  # no code path to load one
