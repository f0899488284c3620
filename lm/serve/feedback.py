"""Feedback capture: users' ratings and corrections become instruction-tuning data.

What this file does:
- `RecentResponses`: the last N responses this server sent (id -> instruction, input, output), so a
  rating can name a response by id; old ones are forgotten (bounded memory).
- `FeedbackLog.append`: one JSONL line per usable example, in the Alpaca format (instruction /
  input / output, plus rating, response_id, model, time) that the instruction DataModule reads.
  A thumbs-up keeps the model's answer as the output; a correction replaces it. A thumbs-down
  without a correction is not a training example: it is counted (metrics, request log) but not
  written. Each line is written with a single `write()` on a file opened with O_APPEND, which the
  OS appends whole even when several processes or threads write at once, and a lock keeps this
  process's writers in order. Nothing already in the file is ever rewritten.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lm.errors import LMError
from lm.io.files import check_writable_folder


@dataclass
class ServedResponse:
    instruction: str
    input: str
    output: str
    model: str


class RecentResponses:
    def __init__(self, capacity: int = 10_000):
        self.capacity = capacity
        self._items: "OrderedDict[str, ServedResponse]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, response_id: str, response: ServedResponse) -> None:
        with self._lock:
            self._items[response_id] = response
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Optional[ServedResponse]:
        with self._lock:
            return self._items.get(response_id)


class FeedbackLog:
    def __init__(self, path: str | Path):
        """Check (and create) the file's folder now, at the server's start, before the model is loaded: a feedback
        file that cannot be written would otherwise show up only as a failed POST /v1/feedback, hours later."""
        self.path = Path(path)
        fix = "--feedback_path FILE, or --feedback_path null to turn feedback off"
        check_writable_folder(self.path.parent, "folder of --feedback_path", fix)
        if self.path.is_dir():
            raise LMError(f"--feedback_path {self.path} is a folder: name a file in it, e.g. "
                          f"--feedback_path {self.path / 'feedback.jsonl'}.")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise LMError(f"--feedback_path {self.path} is not writable: fix its permissions, or pass {fix}.")
        self._lock = threading.Lock()

    def append(self, response_id: str, response: ServedResponse, rating: Optional[str],
               correction: Optional[str]) -> bool:
        """Append the training example for this feedback; False if it is not one (bare thumbs-down)."""
        if correction is None and rating != "up":
            return False
        record = {"instruction": response.instruction, "input": response.input,
                  "output": correction if correction is not None else response.output,
                  "rating": rating, "corrected": correction is not None, "response_id": response_id,
                  "model": response.model, "time": time.time()}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
            finally:
                os.close(fd)
        if written != len(line):  # a full disk: say so rather than leave a silent half line
            raise OSError(f"Only {written} of {len(line)} bytes of a feedback line were written to {self.path}.")
        return True
