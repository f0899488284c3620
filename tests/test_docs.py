"""The documentation: the site builds, the README stays a front door whose facts match the tree and the recipe."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_the_documentation_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: every page in the nav exists, every link between pages resolves."""
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "results" / "generation-quality" / "index.html").is_file()


def test_readme_is_a_front_door():
    assert len(README.splitlines()) < 400
    for target in re.findall(r"\]\((docs/[^)#]+)", README):  # every link into docs/ points at a page
        assert (REPO_ROOT / target).is_file(), target


def _layout_paths() -> set[str]:
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match or len(match.group(1)) > 6:  # descriptions continued on the next line
            continue
        depth = len(match.group(1)) // 2
        stack = stack[:depth] + [match.group(2)]
        paths.add("".join(stack).rstrip("/"))
    return paths


def test_readme_layout_matches_the_package():
    listed = {p for p in _layout_paths() if p.startswith("lm/")}
    package = REPO_ROOT / "lm"
    actual = {f"lm/{p.relative_to(package)}" for p in package.rglob("*")
              if "__pycache__" not in p.parts and p.name not in ("__init__.py", "__main__.py")
              and (p.is_dir() or p.suffix in (".py", ".yaml", ".html"))}
    actual.discard("lm/serve/static")  # listed as static/index.html
    assert listed - actual == set(), "the layout lists files that do not exist"
    assert actual - listed == set(), "files missing from the README's layout"


def _yaml_value(value) -> str:
    return {True: "true", False: "false", None: "null"}.get(value, str(value)) if not isinstance(value, float) \
        else f"{value:g}" if value != int(value) else f"{value:.1f}"


def test_the_default_recipe_table_is_the_recipe():
    recipe = yaml.safe_load((REPO_ROOT / "experiments" / "wikitext2_cpu.yaml").read_text())
    rows = re.findall(r"^\| `([a-z_.]+)` \| ([^|]+) \|", README.split("## The default recipe", 1)[1], flags=re.MULTILINE)
    assert len(rows) >= 10
    for key, value in rows:
        node = recipe
        for part in key.split("."):
            node = node[part]
        assert _yaml_value(node) == value.strip(), key


def test_the_offline_protocol_described_is_the_overlay():
    overlay = yaml.safe_load((REPO_ROOT / "experiments" / "data" / "wikitext2_offline.yaml").read_text())["data"]
    fraction = overlay["val_fraction"]
    for text in (README, (REPO_ROOT / "docs" / "using.md").read_text()):
        percents = set(re.findall(r"last (\d+)%", text))
        assert percents <= {f"{fraction * 100:g}"}, percents
        assert f"val_fraction 0." not in text or f"val_fraction {fraction:g}" in text


DOCS = {path.relative_to(REPO_ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]}


def _recipe(path: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "experiments" / path).read_text())


def test_the_context_is_documented_on_the_model():
    """The context is stated once, as model.config.max_position_embeddings (lm fit links data.block_size to
    it and refuses it given): no recipe, README row or documented command sets data.block_size, except the
    bad-input page showing it refused."""
    for path in (REPO_ROOT / "experiments").rglob("*.yaml"):
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        assert "block_size" not in {**data, **(data.get("init_args") or {})}, path
    assert "| `data.block_size` |" not in README
    for name, text in DOCS.items():
        for line in text.splitlines():
            if "--data.block_size" in line or re.search(r"^\s*block_size:", line):
                assert name == "docs/bad-input.md" and "names the key to set" in line, (name, line)


def test_the_bad_input_counts_are_the_suite():
    from tests.test_bad_inputs import CASES

    commands = sum(case.argv is not None for case in CASES)
    requests = sum(case.request is not None for case in CASES)
    text = " ".join(DOCS["docs/bad-input.md"].split())
    assert f"one table of {len(CASES)} such cases ({commands} commands, {requests} HTTP requests" in text
    assert len(CASES) > 100 and "over 100 such mistakes" in DOCS["docs/using.md"]


def test_the_alpaca_held_out_share_is_the_recipe():
    fraction = _recipe("finetune/alpaca.yaml")["data"]["init_args"]["val_fraction"]
    text = " ".join(DOCS["docs/evaluation.md"].split())
    assert f"{fraction * 100:g}% is held out" in text and f"held-out {fraction * 100:g}%" in text
    assert "held_out_pairs()" in text  # the command that writes held_out.jsonl, before `--pairs_file held_out.jsonl`


def test_the_accumulation_overlay_comment_is_the_arithmetic():
    base, overlay = _recipe("wikitext2_cpu.yaml"), _recipe("trainer/accumulate.yaml")
    header = (REPO_ROOT / "experiments" / "trainer" / "accumulate.yaml").read_text()
    batch, context = base["data"]["batch_size"], base["model"]["config"]["max_position_embeddings"]
    accumulate = overlay["trainer"]["accumulate_grad_batches"]
    assert f"{batch} * {context} * {accumulate} * 1 = {batch * context * accumulate} tokens per step" in header
    interval = base["trainer"]["val_check_interval"]
    assert overlay["trainer"]["val_check_interval"] == interval * accumulate
    assert f"= {interval} optimizer steps, as in the base recipe" in header


def test_docs_name_no_path_outside_the_repository():
    for name, text in DOCS.items():
        assert "/work/" not in text and "/home/" not in text, name
