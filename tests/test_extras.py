"""Optional dependencies (lm/extras.py, pyproject.toml's extras): the core install stays lean, and a verb
or feature whose extra is missing says which to install in one line instead of an ImportError traceback.
A missing library is simulated with `sys.modules[name] = None` (what `import name` then refuses)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lm.errors import LMError
from lm.extras import EXTRAS, require

REPO = Path(__file__).resolve().parents[1]
PIP_TO_IMPORT = {"prometheus-client": "prometheus_client", "cmeel-mimalloc": None}  # None: a library found by path


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def assert_one_line_naming(error: pytest.ExceptionInfo, extra: str, feature: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(f"{feature} needs the {extra} extra") and f"pip install 'lm[{extra}]'" in message, message


def test_pyproject_extras_are_the_ones_lm_checks_for():
    extras = project()["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        imports = {PIP_TO_IMPORT.get(name, name) for name in map(requirement_name, extras[extra])} - {None}
        assert imports == set(modules), (extra, imports, modules)
    (everything,) = extras["all"]
    assert set(re.fullmatch(r"lm\[(.+)\]", everything).group(1).split(",")) == set(EXTRAS)
    assert "lm[all]" in extras["test"]  # the suite needs every extra
    optional = {requirement_name(r) for extra in EXTRAS for r in extras[extra]}
    core = {requirement_name(r) for r in project()["dependencies"]}
    assert not core & optional, core & optional
    assert {"torch", "lightning", "torchmetrics", "tokenizers", "datasets", "tensorboard", "jsonargparse",
            "safetensors", "numpy", "pyyaml"} == core


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_require_names_the_extra_of_each_missing_module(monkeypatch, extra):
    for module in EXTRAS[extra]:
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)
            with pytest.raises(LMError) as error:
                require(extra, "this feature")
            assert_one_line_naming(error, extra, "this feature")
            assert f"{module} is not installed" in str(error.value)
    assert all(m.__name__ == name for m, name in zip(require(extra, "this feature"), EXTRAS[extra]))


def test_require_says_what_a_broken_install_lacks(tmp_path, monkeypatch):
    (tmp_path / "lm_broken_optional.py").write_text("import lm_not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LMError) as error:
        require("serve", "lm serve", ("lm_broken_optional",))
    assert_one_line_naming(error, "serve", "lm serve")
    assert "importing lm_broken_optional failed: No module named 'lm_not_a_real_module_xyz'" in str(error.value)


def lm_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """`lm <args>` in a fresh process where `module` cannot be imported."""
    script = f"import sys; sys.modules[{module!r}] = None; from lm.cli.main import main; main(sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if k != "LM_DEBUG"}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)


def test_lm_serve_without_the_serve_extra_says_what_to_install():
    result = lm_without("fastapi", "serve", "--ckpt_path", "model.ckpt")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("lm serve: error:")]
    assert line.startswith("lm serve: error: lm serve needs the serve extra (fastapi is not installed): "
                           "pip install 'lm[serve]'"), line
    help_ = lm_without("fastapi", "serve", "--help")  # the options can still be read
    assert help_.returncode == 0 and "--ckpt_path" in help_.stdout, help_.stderr[-3000:]


def test_lm_report_without_matplotlib(monkeypatch, tmp_path):
    from lm.commands.report import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LMError) as error:
        report([str(tmp_path)], output=str(tmp_path / "out"))
    assert_one_line_naming(error, "report", "lm report")
    assert not (tmp_path / "out").exists()  # refused before doing anything


def test_lora_without_peft(monkeypatch):
    from lm.modules.lora import add_lora, merge_lora
    from tests.tiny_checkpoint import tiny_gpt

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(LMError) as error:
        add_lora(tiny_gpt(300), ["qkv_proj"], rank=4, alpha=8, dropout=0.0)
    assert_one_line_naming(error, "finetune", "LoRA fine-tuning (lora_rank > 0)")
    with pytest.raises(LMError) as error:
        merge_lora(tiny_gpt(300))
    assert_one_line_naming(error, "finetune", "Merging LoRA adapters")


@pytest.mark.parametrize("option, module", [("fix_encoding", "ftfy"), ("near_dedup", "datasketch")])
def test_cleaning_options_without_their_library(monkeypatch, option, module):
    from lm.data.preparation.clean import CleaningOptions, clean_documents

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(LMError) as error:  # when the config is read, before any data
        CleaningOptions(**{option: True})
    assert_one_line_naming(error, "data", f"cleaning.{option}")
    assert list(clean_documents(["a document\n"], CleaningOptions())) == ["a document\n"]  # the rest needs nothing


def test_onnx_export_without_onnxscript(monkeypatch, tmp_path):
    from lm.export.onnx import export_onnx
    from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(LMError) as error:
        export_onnx(tiny_gpt(320), tiny_tokenizer(), tmp_path / "onnx")
    assert_one_line_naming(error, "export", "lm export --format onnx")
    assert not (tmp_path / "onnx").exists()


def test_speed_ups_of_the_data_extra_are_just_skipped(monkeypatch):
    import importlib.metadata

    import lm.runtime.allocator as allocator
    from lm.data.preparation.fast_bpe import fast_encoder
    from tests.tiny_checkpoint import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    assert fast_encoder(tokenizer) is not None  # installed here: the fast path
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert fast_encoder(tokenizer) is None  # without tiktoken: HF tokenizers, no error

    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv(allocator.MALLOC_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    allocator._installed_mimalloc.cache_clear()
    try:
        assert allocator.fast_allocator() is None  # no mimalloc: the C library's malloc
    finally:
        allocator._installed_mimalloc.cache_clear()
