"""Shared fixtures: a small corpus the tests write themselves, and paths to ../shared/data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, SHARED_DATA, WIKITEXT_DIR  # noqa: F401  (re-exported for older imports)


def make_corpus(n_docs: int = 40, seed: int = 0) -> str:
    """WikiText-shaped text: ' = Title = ' headings, sections and sentences from a small grammar,
    so a tiny model has real structure to learn and BPE has merges to find."""
    rng = random.Random(seed)
    subjects = ["The river", "A small town", "The old castle", "Her first album", "The railway", "This species"]
    verbs = ["was built in", "was recorded in", "is found near", "became famous in", "was destroyed in"]
    objects = ["the north of England", "1854", "the early spring", "a quiet valley", "the capital city"]
    docs = []
    for d in range(n_docs):
        lines = [f" = Article number {d} = ", ""]
        for s in range(3):
            lines.append(f" = = Section {s} = = ")
            lines.append("")
            sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(6)]
            lines.append(" " + " ".join(sentences))
            lines.append("")
        docs.append("\n".join(lines) + "\n")
    return "".join(docs)


def write_corpus_files(folder: Path, train_docs: int = 60) -> dict[str, Path]:
    """train / valid / test text files of the small corpus in `folder`, with different contents."""
    files = {}
    for split, (n_docs, seed) in {"train": (train_docs, 0), "valid": (8, 1), "test": (8, 2)}.items():
        path = folder / f"wiki.{split}.raw"
        path.write_text(make_corpus(n_docs, seed), encoding="utf-8")
        files[split] = path
    return files


@pytest.fixture
def corpus_files(tmp_path: Path) -> dict[str, Path]:
    """train / valid / test text files of the small corpus, with different contents."""
    return write_corpus_files(tmp_path)
