"""LitData path for multi-node scale: token chunks written by ``litdata.optimize``, streamed back with
``StreamingDataset`` / ``StreamingDataLoader``.

``write_chunks`` turns a prepared training split (its shards) into LitData chunks with a
``TokensLoader``: token ids back to back, ``chunk_size`` a multiple of ``block_size + 1``. The chunk
folder can be a local path or object storage (``s3://...``); every rank then streams its own part
(LitData splits chunks across ranks and workers by itself) and downloads ahead, so no node needs the
whole corpus on local disk. Items are the non-overlapping windows ``tokens[k*(B+1) : (k+1)*(B+1)]``:
inputs ``window[:-1]``, targets ``window[1:]``, the same windows (and loss) as reading those slices
from the memmap shards. ``StreamingDataLoader`` has ``state_dict``/``load_state_dict``, which Lightning
saves in checkpoints: resuming inside an epoch works as on the memmap path.

LitData is optional: ``pip install --no-deps litdata`` plus its small dependencies (``make venv``
does this); its torchvision requirement would otherwise replace a CPU build of torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.data.token_cache import TokenShards
from lm.errors import LMError

logger = logging.getLogger("lm.data")

CHUNK_WINDOWS = 2048  # windows per chunk: (B+1) * 2048 ids, e.g. 1 MB of int32 ids at B=128
_INSTALL = "pip install --no-deps litdata && pip install boto3 obstore filelock requests lightning-utilities"


def _litdata() -> Any:
    try:
        import litdata
    except ImportError as err:
        raise LMError(f"--data.loader litdata needs the litdata package: {_INSTALL}") from err
    return litdata


def chunk_dir(base: str, block_size: int) -> str:
    """Chunks depend on the window length (a chunk holds whole windows): one folder per block size."""
    return f"{base.rstrip('/')}/block-{block_size + 1}"


def _piece(task: tuple[list[str], list[int], str, int, int]) -> Iterator[torch.Tensor]:
    """One item for ``optimize``: ids ``[start, stop)`` of the split as int32 (torch has no uint16 math)."""
    files, lengths, dtype, start, stop = task
    tokens = TokenShards([Path(f) for f in files], lengths, np.dtype(dtype))
    yield torch.from_numpy(np.asarray(tokens[start:stop], dtype=np.int32))


def write_chunks(prepared: Any, base: str, block_size: int) -> str:
    """Write LitData chunks of a prepared split (skipped when a finished local index exists).

    Each chunk is one item of ``(block_size + 1) * CHUNK_WINDOWS`` ids cut from the whole split
    (the last one trimmed to whole windows), so window ``k`` is ``tokens[k*(B+1) : (k+1)*(B+1)]``.
    """
    litdata = _litdata()
    output = chunk_dir(base, block_size)
    if "://" not in output and (Path(output) / "index.json").is_file() and _has_chunks(Path(output)):
        logger.info("LitData chunks hit: %s", output)
        return output
    tokens = prepared.tokens()
    window, size = block_size + 1, (block_size + 1) * CHUNK_WINDOWS
    usable = len(tokens) // window * window
    if usable == 0:
        raise LMError(f"The training split has {len(tokens)} tokens, too few for one window of {window}.")
    files, lengths = [str(f) for f in tokens.files], tokens.lengths
    tasks = [(files, lengths, tokens.dtype.str, start, min(start + size, usable)) for start in range(0, usable, size)]
    logger.info("Writing LitData chunks of %s -> %s", prepared.folder, output)
    litdata.optimize(fn=_piece, inputs=tasks, output_dir=output, chunk_size=size, item_loader=litdata.TokensLoader(),
                     num_workers=1, reorder_files=False, mode="overwrite", verbose=False,
                     start_method="fork")  # fork: spawn would re-run the calling script  # fmt: skip
    if "://" not in output and not _has_chunks(Path(output)):
        raise LMError(f"litdata.optimize wrote no chunks to {output} (see its log above).")
    return output


def _has_chunks(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "index.json").read_text())["chunks"])
    except (OSError, ValueError, KeyError):
        return False


def streaming_dataset(base: str, block_size: int, seed: int, shuffle: bool = True) -> Any:
    """Windows of ``block_size + 1`` ids streamed from the chunks (shuffled by chunk and within, per epoch)."""
    litdata = _litdata()
    return litdata.StreamingDataset(chunk_dir(base, block_size), item_loader=litdata.TokensLoader(block_size=block_size + 1),
                                    shuffle=shuffle, drop_last=True, seed=seed)  # fmt: skip


def collate_windows(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.stack(items).long()
    return windows[:, :-1], windows[:, 1:]


def streaming_loader(dataset: Any, batch_size: int, num_workers: int = 0) -> Any:
    """A ``StreamingDataLoader`` of ``(inputs, targets)`` batches; its state goes into checkpoints."""
    litdata = _litdata()
    return litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate_windows, drop_last=True)  # fmt: skip
