"""A killed `lm prepare`, `lm quantize` or `lm export` (SIGKILL of a real process, frozen half-way through
writing by tests/crash_hooks.py) leaves the previous good output byte for byte, and nothing a later run
trusts: the next run rebuilds and gets what a clean run gets."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch

from lm.io.checkpoints import load_model
from lm.cli.main import main
from lm.errors import LMError
from lm.export.folder import write_folder
from lm.export.safetensors import load_folder

from tests.crash_hooks import kill_when_frozen, start_frozen_verb
from tests.helpers import tiny_data
from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint


def visible_files(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` that a reader uses (not `.hidden` temporaries)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def prepare_args(corpus_files, cache: Path, vocab_size: int) -> list[str]:
    args = tiny_data(corpus_files, cache)
    args[args.index("--data.vocab_size") + 1] = str(vocab_size)
    return ["prepare", *args]


def shards(cache: Path) -> dict[str, bytes]:
    """split folder (`<split>-<settings hash>`) -> its token bytes, for every committed split (a manifest)."""
    return {folder.name: b"".join(p.read_bytes() for p in sorted(folder.glob("shard-*.bin")))
            for folder in (cache / "tokens").iterdir() if (folder / "manifest.json").is_file()}


def test_killed_prepare_keeps_the_previous_cache_and_is_rebuilt(tmp_path, corpus_files):
    cache = tmp_path / "cache"
    main(prepare_args(corpus_files, cache, 300))  # the previous good output
    before = visible_files(cache)
    marker = tmp_path / "prepare.frozen"
    kill_when_frozen(start_frozen_verb(tmp_path, marker, "shard_write", prepare_args(corpus_files, cache, 280)), marker)

    after = visible_files(cache)
    assert {k: after.get(k) for k in before} == before  # nothing of the earlier prepare changed
    half = [f for f in (cache / "tokens").iterdir() if not (f / "manifest.json").exists()]
    assert len(half) == 1 and any(p.stat().st_size for p in half[0].glob("shard-*.bin"))  # killed mid-shard

    main(prepare_args(corpus_files, cache, 280))  # rebuilds the half split: nothing of it is trusted
    main(prepare_args(corpus_files, tmp_path / "clean", 280))
    rebuilt, clean = shards(cache), shards(tmp_path / "clean")
    assert len(clean) == 3 and len(rebuilt) == 6  # both prepares' splits, each committed
    assert {name: rebuilt[name] for name in clean} == clean  # the same tokens as a prepare never killed


@pytest.fixture
def checkpoints(tmp_path) -> tuple[Path, Path]:
    tokenizer = tiny_tokenizer()
    return (write_checkpoint(tmp_path / "a.ckpt", tiny_gpt(tokenizer.vocab_size, seed=0), tokenizer),
            write_checkpoint(tmp_path / "b.ckpt", tiny_gpt(tokenizer.vocab_size, seed=1), tokenizer))


def test_killed_quantize_keeps_the_previous_file(tmp_path, checkpoints):
    a, b = checkpoints
    output = tmp_path / "int8.ckpt"
    main(["quantize", "--ckpt_path", str(a), "--output", str(output)])
    before = output.read_bytes()
    marker = tmp_path / "quantize.frozen"
    argv = ["quantize", "--ckpt_path", str(b), "--output", str(output), "--overwrite", "true"]
    kill_when_frozen(start_frozen_verb(tmp_path, marker, "atomic_write", argv), marker)

    assert output.read_bytes() == before
    partial = list(tmp_path.glob(".int8.ckpt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(before)  # killed mid-write, set aside
    load_model(output)  # the previous output still loads
    main(argv)
    assert output.read_bytes() != before
    load_model(output)


def test_killed_export_keeps_the_previous_folder(tmp_path, checkpoints):
    a, b = checkpoints
    output = tmp_path / "export"
    main(["export", "--ckpt_path", str(a), "--output", str(output)])
    before = visible_files(output)
    marker = tmp_path / "export.frozen"
    argv = ["export", "--ckpt_path", str(b), "--output", str(output), "--overwrite", "true"]
    kill_when_frozen(start_frozen_verb(tmp_path, marker, "export", argv), marker)

    assert visible_files(output) == before
    partial = list(tmp_path.glob(".export.*.tmp"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()  # half an export, set aside
    model_a, _ = load_folder(output)
    main(argv)
    model_b, _ = load_folder(output)
    expected, _ = load_model(b)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[name], value)
    assert not torch.equal(model_a.state_dict()["embed_tokens.weight"], model_b.state_dict()["embed_tokens.weight"])


def test_an_export_swap_cut_between_its_two_renames_is_undone(tmp_path, monkeypatch):
    """Where the atomic exchange is missing, the fallback renames the old folder aside first: a kill then
    leaves `.<name>.old` and no `<name>`, which the next export puts back before anything else."""
    output = tmp_path / "export"
    write_folder(output, lambda folder: (folder / "weights").write_text("old"))
    output.rename(tmp_path / ".export.old")  # the state a kill between the renames leaves
    with pytest.raises(LMError, match="already exists"):
        write_folder(output, lambda folder: (folder / "weights").write_text("new"))
    assert (output / "weights").read_text() == "old"
    monkeypatch.setattr("lm.export.folder._exchange", lambda a, b: False)
    write_folder(output, lambda folder: (folder / "weights").write_text("new"), overwrite=True)
    assert (output / "weights").read_text() == "new" and not (tmp_path / ".export.old").exists()


def test_overwrite_replaces_an_earlier_export_and_nothing_else(tmp_path):
    """`--overwrite` never removes what it did not write: a folder with a user's files beside (or instead of)
    an export is refused with their names, and left as it was; exports are readable as the umask says."""
    output = tmp_path / "export"
    write_folder(output, lambda folder: (folder / "config.json").write_text("export 1"))
    write_folder(output, lambda folder: (folder / "config.json").write_text("export 2"), overwrite=True)
    assert (output / "config.json").read_text() == "export 2"  # an earlier export is replaced
    (output / "notes.txt").write_text("mine")
    with pytest.raises(LMError, match=r"holds files this export did not write \(notes.txt\)"):
        write_folder(output, lambda folder: (folder / "config.json").write_text("export 3"), overwrite=True)
    assert (output / "notes.txt").read_text() == "mine" and (output / "config.json").read_text() == "export 2"
    users = tmp_path / "users_own"
    users.mkdir()
    (users / "config.json").write_text("the user's own")
    with pytest.raises(LMError, match=r"config.json"):
        write_folder(users, lambda folder: (folder / "config.json").write_text("export"), overwrite=True)
    assert (users / "config.json").read_text() == "the user's own"
    old = os.umask(0o022)
    try:
        shared = write_folder(tmp_path / "shared", lambda folder: (folder / "model.bin").write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and stat.S_IMODE((shared / "model.bin").stat().st_mode) == 0o644
