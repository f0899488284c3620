"""Checks `lm fit|validate|test|predict` makes once the config is parsed, before anything runs or is written.

Each one catches a mistake that used to run to the end silently or fail late with a traceback:
- `checked_ckpt_path`: a missing `--ckpt_path`, or a folder given where a checkpoint file belongs;
- `check_run_folders`: validate/test/predict without a checkpoint (random weights, unless
  `--random_weights true` says so), an empty or escaping `--experiment` name, `--ckpt_path last` of an
  experiment that has no checkpoints (a mistyped name trained from scratch, or evaluated random weights),
  a log folder that is a file, a second run of an experiment that is running (the experiment lock,
  below), and a new `lm fit` into a checkpoint folder that already holds checkpoints (its `last.ckpt`
  would go stale);
- `refuse_block_size`: `data.block_size` given on the command line or in a YAML file. `lm fit` cuts its
  windows at the model's context, `model.config.max_position_embeddings` (a jsonargparse link), so the
  context is stated once; jsonargparse itself refuses the flag with a bare message and drops a YAML
  value without a word. `LMCLI.parse_arguments` calls it with the raw command line, the one place that
  sees it, so it also runs the other checks that need to know what was *given* (`check_command_line`):
  a key given twice in a YAML file, and options a checkpoint (`--ckpt_path`) overrides (below).

Options a checkpoint overrides. With `--ckpt_path`, the model is the checkpoint's: its class and every
saved hyper-parameter replace the config's, and its tokenizer replaces the data's. An option given
otherwise used to be dropped without a word. Now:
- an architecture option (`model.config.*`, the model class) given on the command line and different
  from the checkpoint's is refused (it cannot apply to these weights); given in a YAML file (a recipe
  shared with other runs) it is a warning naming the checkpoint's value;
- a training option of the model (`model.learning_rate`, `model.schedule`, ...) different from the
  checkpoint's is a warning on `lm fit` (the run resumes with the saved optimizer and schedule) and
  ignored on the verbs that do not train;
- `data.vocab_size` other than the checkpoint's vocabulary is refused (the model would be built with
  another embedding size, and fail with a traceback while loading the weights);
- tokenizer-training options (`data.tokenizer_kind`, `data.min_frequency`, `data.special_tokens`) given on
  the command line are a warning: the checkpoint's tokenizer is used. A different `data.tokenizer_path` is
  refused by `TextDataModule.set_tokenizer`.

The experiment lock: a run that writes into checkpoints/<experiment>/ or logs/<experiment>/ (every verb
here) holds an exclusive `flock` on `checkpoints/.<experiment>.lock` (beside the folder, so a refused or
failed run leaves no folder behind) for the life of its process. A second run of the same experiment
started meanwhile is refused, naming the pid holding it; the kernel releases the lock when the process
ends, however it ends (a process that runs several experiments in turn, e.g. a notebook calling
`lm.cli.main.main`, holds the last one's). In a distributed run only the launching process (global rank 0)
takes it.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from lm.cli.config_errors import config_files, refuse_duplicate_keys
from lm.data import TextDataModule
from lm.errors import LMError, MissingFileError
from lm.io.checkpoints import read_checkpoint
from lm.io.files import check_folder_path, describe_holder, lock_holder, release_lock, try_lock
from lm.modules import LanguageModel  # its RUN_TIME_ARGS are the command line's, never the checkpoint's

log = logging.getLogger("lm")

CONTEXT_KEY = "model.config.max_position_embeddings"  # the source of the link; data.block_size its target
RUN_VERBS = ("fit", "validate", "test", "predict")
EVAL_VERBS = ("validate", "test", "predict")
STOCK_MODELS = {"lm.modules.LanguageModel", "lm.modules.language_model.LanguageModel"}
TOKENIZER_TRAINING = ("data.tokenizer_kind", "data.min_frequency", "data.special_tokens")
_held_locks: dict[Path, int] = {}  # lock file -> descriptor: this process's experiment locks, held until it ends


def checked_ckpt_path(ckpt_path: Optional[str], subcommand: str) -> bool:
    """True if `ckpt_path` is a checkpoint file to read; False for none or a sharded checkpoint folder
    (a distributed checkpoint, read by its strategy). A missing path or another folder is an `LMError`."""
    if not ckpt_path:
        return False
    path = Path(ckpt_path)
    if path.is_dir():
        if (path / ".metadata").is_file() or (path / "meta.pt").is_file():
            return False
        inside = sorted(p.name for p in path.glob("*.ckpt"))[:3]
        example = f" e.g. {path / inside[0]}" if inside else ""
        raise LMError(f"--ckpt_path {path} is a folder, not a checkpoint file: pass a file in it,{example or ' e.g. last.ckpt'} "
                      f"({', '.join(inside) or 'it holds no .ckpt file'}).")
    if not path.is_file():
        raise MissingFileError(f"Checkpoint not found: {path}. Runs write them to checkpoints/<experiment>/ "
                               f"(last.ckpt and the best); `lm {subcommand} --ckpt_path checkpoints/<experiment>/last.ckpt`.")
    return True


def check_run_folders(subcommand: Optional[str], config: Any) -> None:
    """The experiment name, the checkpoint a non-fit verb needs, `--ckpt_path last` of a run that exists,
    the experiment lock, and a fit that would reuse a folder."""
    name = config.get("experiment")
    if name is not None:
        _check_experiment_name(str(name))
    ckpt_path = config.get("ckpt_path")
    if subcommand in EVAL_VERBS and not ckpt_path and not config.get("random_weights"):
        raise LMError(f"lm {subcommand} needs --ckpt_path (a checkpoint of `lm fit`, e.g. checkpoints/<experiment>/last.ckpt): "
                      f"without one it would use random weights. For a random-weights baseline pass --random_weights true.")
    dirpath = Path((config.get("checkpoint") or {}).get("dirpath") or f"checkpoints/{name}")
    if ckpt_path == "last" and subcommand in RUN_VERBS:
        _check_last_exists(subcommand, dirpath, str(name))
    if subcommand in RUN_VERBS and launching_process():  # DDP children re-run the command: the parent checked
        if subcommand in EVAL_VERBS:  # (fit checks its output folders in full before training: check_run_outputs)
            check_folder_path(Path("logs") / str(name), "log folder", "--experiment NAME")
        hold_experiment_lock(dirpath, str(name), subcommand)
        if subcommand == "fit":  # after the lock: a run that ended meanwhile has left its checkpoints to see
            _check_fresh_checkpoint_folder(dirpath, ckpt_path, name)


def launching_process() -> bool:
    """False in the extra processes of a distributed run (Lightning's DDP children, which re-run the
    command, and the ranks > 0 that torchrun or SLURM start): the outputs are the first process's."""
    return all(int(os.environ.get(var) or 0) == 0
               for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID"))


def _check_experiment_name(name: str) -> None:
    if not name.strip():
        raise LMError("--experiment is empty: name the run, e.g. --experiment my_run (logs go to logs/<name>, "
                      "checkpoints to checkpoints/<name>).")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise LMError(f"--experiment {name!r} would write outside logs/ and checkpoints/: use a plain name such as my_run.")


def _check_last_exists(subcommand: str, dirpath: Path, name: str) -> None:
    """`--ckpt_path last` names the experiment's own last.ckpt. Lightning, when there is none, trains from
    scratch (fit) or runs the untrained model (validate/test/predict), and only warns: a mistyped
    `--experiment` went unnoticed. A fit whose folder exists (a run that stopped before its first save)
    still starts afresh, as Lightning does."""
    if (dirpath / "last.ckpt").is_file() or (subcommand == "fit" and dirpath.is_dir()):
        return
    runs = sorted(p.parent.name for p in dirpath.parent.glob("*/last.ckpt"))
    found = f"Experiments with a last.ckpt in {dirpath.parent}/: {', '.join(runs[:10])}" if runs else \
        f"No experiment in {dirpath.parent}/ has a last.ckpt yet"
    outcome = "train from scratch" if subcommand == "fit" else "run random weights"
    missing = f"{dirpath}/ does not exist" if not dirpath.is_dir() else f"{dirpath}/ holds no last.ckpt"
    fix = "start a new run without --ckpt_path" if subcommand == "fit" else "pass --ckpt_path FILE"
    raise LMError(f"--ckpt_path last: {missing} (experiment {name!r}), so lm {subcommand} would {outcome}. "
                  f"{found}. Check --experiment, or {fix}.")


def hold_experiment_lock(dirpath: Path, name: str, subcommand: str) -> None:
    """Take the experiment's lock (`checkpoints/.<experiment>.lock`) for the life of this process, or refuse
    the run, naming the process that holds it. Taken again by the same process, it is already held; a process
    that runs another experiment after this one (in-process runs: tests, a notebook) gives it up then."""
    folder = dirpath.resolve()
    lock = folder.parent / f".{folder.name}.lock"
    if lock in _held_locks:
        return
    for earlier in list(_held_locks):  # runs in one process (tests, a notebook) are one at a time: the last ended
        release_lock(_held_locks.pop(earlier))
    check_folder_path(lock.parent, "checkpoint folder", "--experiment NAME or --checkpoint.dirpath DIR")
    fd = try_lock(lock, f"lm {subcommand}")
    if fd is None:
        holder = describe_holder(lock_holder(lock))
        then = ", then resume it with --ckpt_path last" if subcommand == "fit" else ""
        raise LMError(f"Experiment {name!r} is in use by another run ({holder}; it holds {lock}): two runs of one "
                      f"experiment would mix their checkpoints and logs. Wait for that run to end{then}, or give "
                      f"this one another --experiment name.")
    _held_locks[lock] = fd


def _check_fresh_checkpoint_folder(dirpath: Path, ckpt_path: Optional[str], name: str) -> None:
    """A second `lm fit --experiment X` would write `last-v1.ckpt` beside the old `last.ckpt`, which then
    silently names the old model: refuse unless the run resumes from a checkpoint of that folder."""
    existing = sorted(p.name for p in dirpath.glob("*.ckpt")) if dirpath.is_dir() else []
    if not existing:
        return
    if ckpt_path == "last" or (ckpt_path and Path(ckpt_path).resolve().parent == dirpath.resolve()):
        return
    raise LMError(f"{dirpath}/ already holds checkpoints of an earlier run ({', '.join(existing[:3])}): resume it with "
                  f"--ckpt_path last, or start a new run with another --experiment name (or delete {dirpath}/ first).")


# ------------------------------------------------------------------------- checks of the raw command line
def refuse_block_size(args: list[str]) -> None:
    """An `LMError` naming `model.config.max_position_embeddings` if `args` (a command line) or a YAML file
    it passes to `--config` or `--data` sets `data.block_size`, which `lm fit` takes from the model.
    Then the other checks of the command line (`check_command_line`)."""
    refuse_duplicate_keys(config_files(args))
    given = _block_sizes_given(args)
    if given:
        where, value = given[0]
        example = value if isinstance(value, int) and not isinstance(value, bool) else "N"
        raise LMError(f"data.block_size is set {where}, but lm cuts its windows at the model's context: state it "
                      f"once, as {CONTEXT_KEY} (e.g. --{CONTEXT_KEY} {example}), and drop data.block_size.")
    check_command_line(args)


def check_command_line(args: list[str]) -> None:
    """What `lm fit|validate|test|predict <args>` gives that its checkpoint (`--ckpt_path`) overrides: a
    refusal or warning lines, as the module docstring says. Other command lines (`lm prepare`'s, a recipe
    read by `lm plan`) have no verb first and are left alone."""
    if not args or args[0] not in RUN_VERBS:
        return
    given = _given_values(args[1:])
    ckpt = _checkpoint_file(given)
    checkpoint = _readable(ckpt) if ckpt is not None else None
    hparams = (checkpoint or {}).get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict):
        return  # no checkpoint, or not one of `lm fit`: reported later, by the code that reads it
    _check_vocab_size(given, hparams["config"].get("vocab_size"), ckpt)
    refused, warned = _overridden(_last_values(given), hparams, ckpt, args[0])
    if refused:
        more = f" The checkpoint also overrides {', '.join(key for key, _ in refused[1:])}." if len(refused) > 1 else ""
        raise LMError(f"{refused[0][1]}.{more}")
    if launching_process():
        for line in warned:
            log.warning(line)


def _block_sizes_given(args: list[str]) -> list[tuple[str, Any]]:
    """(where, value) of each `data.block_size` the arguments set: flags first, then files."""
    found = [(where, value) for key, value, where in _given_values(args) if key == "data.block_size"]
    return sorted(found, key=lambda item: item[0] != "on the command line")


def _given_values(args: list[str]) -> list[tuple[str, Any, str]]:
    """(dotted key, value, where) of every value `args` give, in order (later wins), `init_args` levels left
    out: a flag (`--model.config.hidden_size 64`, `--key=value`), a `--config` file, a `--data` or `--model`
    section (a file or inline YAML; a plain string there is the class path). Values are read as YAML."""
    found: list[tuple[str, Any, str]] = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") or arg.startswith("--config="):
            path = arg.partition("=")[2] or (args[i + 1] if i + 1 < len(args) else "")
            text = _read(path)
            if text is not None:
                _flatten("", _load_yaml(text), f"in {path}", found)
            continue
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        key = ".".join(part for part in name.split(".") if part != "init_args")
        if key in ("data", "model"):
            text = _read(value)
            section = _load_yaml(text if text is not None else value)
            where = f"in {value}" if text is not None else f"in --{key}"
            if isinstance(section, str):
                found.append((f"{key}.class_path", section, "on the command line"))
            else:
                _flatten(key, section, where, found)
        else:
            loaded = _load_yaml(value)
            _flatten(key, value if loaded is None and value not in ("null", "~", "") else loaded,
                     "on the command line", found)
    return found


def _flatten(prefix: str, value: Any, where: str, found: list[tuple[str, Any, str]]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(prefix if key == "init_args" else f"{prefix}.{key}".lstrip("."), inner, where, found)
    elif prefix:
        found.append((prefix, value, where))


def _last_values(given: list[tuple[str, Any, str]]) -> dict[str, tuple[Any, str]]:
    return {key: (value, where) for key, value, where in given}


def _checkpoint_file(given: list[tuple[str, Any, str]]) -> Optional[Path]:
    """The checkpoint file `--ckpt_path` names (`last`: the experiment's last.ckpt), if it is one."""
    values = {key: value for key, value, _ in given}
    ckpt = values.get("ckpt_path")
    if not ckpt or not isinstance(ckpt, str):
        return None
    if ckpt == "last":
        folder = values.get("checkpoint.dirpath") or f"checkpoints/{values.get('experiment', 'default')}"
        ckpt = str(Path(str(folder)) / "last.ckpt")
    return Path(ckpt) if Path(ckpt).is_file() else None


def _readable(path: Path) -> Optional[dict[str, Any]]:
    try:
        return read_checkpoint(path)
    except LMError:
        return None  # refused later, with the message of the verb that reads it


def _check_vocab_size(given: list[tuple[str, Any, str]], saved: Any, ckpt: Path) -> None:
    """The model's vocabulary is `data.vocab_size` (a link), even with a checkpoint: another size would build
    an embedding the checkpoint's weights do not fit (a traceback while loading them)."""
    values = _last_values(given)
    default = inspect.signature(TextDataModule).parameters["vocab_size"].default
    value, where = values.get("data.vocab_size", (default, "(its default)"))
    if not isinstance(saved, int) or _same(value, saved):
        return
    also = "" if "default" in where else f" (and drop the setting that gives {value})"
    raise LMError(f"data.vocab_size is {value} {where}, but the checkpoint {ckpt} was trained with a vocabulary of "
                  f"{saved} tokens: the model's embedding must keep that size. Pass --data.vocab_size {saved}{also}.")


def _overridden(values: dict[str, tuple[Any, str]], hparams: dict[str, Any], ckpt: Path,
                verb: str) -> tuple[list[tuple[str, str]], list[str]]:
    """([(flag, refusal)], [warning]) for the given options that differ from the checkpoint's saved values."""
    refused: list[tuple[str, str]] = []
    warned: list[str] = []
    for key, (value, where) in values.items():
        saved, architecture = _saved_value(key, hparams)
        if saved is _UNSAVED or _same(value, saved):
            continue
        flag = where == "on the command line"
        if architecture and flag:
            what = "resumes" if verb == "fit" else "is evaluated"
            refused.append((f"--{key}", f"--{key} {_show(value)} is given, but the checkpoint {ckpt} was trained "
                            f"with {_show(saved)}: the model {what} with the checkpoint's architecture, so the option "
                            f"cannot apply. Drop it (another architecture is a new run: another --experiment, "
                            f"without --ckpt_path)"))
        elif architecture:
            warned.append(f"{key} is {_show(value)} {where}, but the checkpoint {ckpt} has {_show(saved)}: the "
                          f"checkpoint's value is used.")
        elif verb == "fit":
            warned.append(f"{key} {_show(value)} ({where}) is not used: the run resumes with the checkpoint's "
                          f"{_show(saved)} (its optimizer and learning-rate schedule are restored as saved). To go "
                          f"on from these weights with new settings, start a new run with --model.init_from {ckpt}.")
    warned += [f"--{key} is not used: the checkpoint's own tokenizer is." for key in TOKENIZER_TRAINING
               if key in values and values[key][1] == "on the command line"]
    return refused, warned


_UNSAVED = object()


def _saved_value(key: str, hparams: dict[str, Any]) -> tuple[Any, bool]:
    """(the checkpoint's value of a given `model.*` key or _UNSAVED, whether it is architecture)."""
    if not key.startswith("model."):
        return _UNSAVED, False
    rel = key[len("model."):]
    if rel == "class_path":
        saved = hparams.get("_class_path") or "lm.modules.LanguageModel"
        return ("lm.modules.LanguageModel" if saved in STOCK_MODELS else saved), True
    if rel.startswith("config."):
        field = rel[len("config."):]
        if field == "vocab_size" or field not in hparams["config"]:  # vocab_size: linked from data.vocab_size
            return _UNSAVED, True
        return hparams["config"][field], True
    if "." in rel or rel.startswith("_") or rel in LanguageModel.RUN_TIME_ARGS or rel not in hparams:
        return _UNSAVED, False
    return hparams[rel], False


def _same(given: Any, saved: Any) -> bool:
    """Equal as values: `1e-3` read as a string, a list for a tuple, a stock class path by either name."""
    if isinstance(given, str) and isinstance(saved, (int, float)) and not isinstance(saved, bool):
        try:
            given = float(given)
        except ValueError:
            return False
    if isinstance(given, (list, tuple)) and isinstance(saved, (list, tuple)):
        return len(given) == len(saved) and all(_same(a, b) for a, b in zip(given, saved))
    if isinstance(given, bool) or isinstance(saved, bool):
        return given is saved
    if given in STOCK_MODELS and saved in STOCK_MODELS:
        return True
    return given == saved


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _read(path: str) -> Optional[str]:
    """The text of the file `path`, or None if it is no readable file (a value given inline)."""
    try:
        return Path(path).read_text(encoding="utf-8") if path and Path(path).is_file() else None
    except (OSError, UnicodeDecodeError):
        return None  # the parser reports an unreadable file


def _load_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):
        return None  # a broken file is reported by the parser, with its line and column
