"""Training callbacks for `lm fit`, one file each, each selectable from YAML (overlays in
experiments/trainer/callbacks/, appended with `callbacks+:` so they combine).

- `LastStepCheckpoint` (checkpointing.py): ModelCheckpoint whose `last.ckpt` holds a finished fit's final step, validated.
- `RNGStateCheckpoint` (rng_state.py): saves the random generators in checkpoints, restores them on resume.
- `TokenThroughputMonitor` (throughput.py): tokens/s, FLOP/s and MFU; `measure_matmul_flops` for the peak.
- `TextSampler` (text_sampler.py): completions of fixed prompts every N steps, logged as text.
- `NonFiniteGuard` (nonfinite.py): stops at the first NaN/inf loss or gradient, naming the last good checkpoint.
- `ExponentialMovingAverage` (ema.py): validate, save and finish with the weights' moving average.
- `PredictionWriter` (prediction_writer.py): `lm predict`'s JSON-lines output.
- `PreemptionCheckpoint` (preemption.py): on SIGTERM, stop at the next step boundary with a resumable `last.ckpt`
  and exit 143 (on by default in every `lm fit`; no recipe lists it).
- `ContextCacheCalibration` (context_cache_calibration.py): a context cache's scalars fitted on each validation
  (added by `LanguageModel.configure_callbacks` when the model has one; no recipe lists it).
- `TrainingContextSchedule` (training_context.py): short training windows (same tokens per step) until a share of
  the run, then the model's full context.
- `LateDropout` (late_dropout.py): the network's dropout off until a share of the run, on after it.

    lm fit --config experiments/wikitext2_cpu.yaml --config experiments/trainer/callbacks/throughput.yaml \\
           --config experiments/trainer/callbacks/text_sampler.yaml
"""

from lm.callbacks.checkpointing import LastStepCheckpoint, last_good_checkpoint
from lm.callbacks.context_cache_calibration import ContextCacheCalibration
from lm.callbacks.ema import ExponentialMovingAverage
from lm.callbacks.late_dropout import LateDropout
from lm.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
from lm.callbacks.prediction_writer import PredictionWriter
from lm.callbacks.preemption import PREEMPTED_EXIT_STATUS, PreemptionCheckpoint
from lm.callbacks.rng_state import RNGStateCheckpoint
from lm.callbacks.text_sampler import TextSampler
from lm.callbacks.throughput import (
                                     TokenThroughputMonitor,
                                     batch_size,
                                     measure_matmul_flops,
                                     model_flops_per_token,
                                     num_tokens,
)
from lm.callbacks.training_context import TrainingContextSchedule, split_windows

__all__ = [
    "ContextCacheCalibration",
    "ExponentialMovingAverage",
    "LastStepCheckpoint",
    "LateDropout",
    "last_good_checkpoint",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PREEMPTED_EXIT_STATUS",
    "PredictionWriter",
    "PreemptionCheckpoint",
    "RNGStateCheckpoint",
    "TextSampler",
    "TokenThroughputMonitor",
    "TrainingContextSchedule",
    "batch_size",
    "measure_matmul_flops",
    "model_flops_per_token",
    "num_tokens",
    "split_windows",
]
