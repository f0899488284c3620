"""An `lm` checkpoint as a model of EleutherAI's lm-evaluation-harness (the `harness` extra: `pip install 'lm[harness]'`).

    lm eval --ckpt_path ckpt --harness_tasks hellaswag,arc_easy --harness_limit 200     # lm's verb
    python -m lm.evaluation.harness --model lm --model_args ckpt_path=ckpt --tasks wikitext  # the harness's own CLI

`LMHarnessModel` implements the harness's three requests on any network `load_model` returns (a `GPT`, a
`GPTWithContextCache`, a subclass's `build_model`, an `lm quantize` / `prune` / `merge` output):

- `loglikelihood(context, continuation)`: the harness's `TemplateLM` tokenizes the pair (trailing spaces of the
  context move to the continuation; an empty context is `<|endoftext|>`); here the requests are sorted longest
  first (the harness's `Collator`), right-padded and scored one forward per batch. Right padding changes nothing a
  real token sees under causal attention (lm/evaluation/perplexity.py relies on the same). A pair longer than the
  context keeps its last `context + 1` tokens, as the harness's HF model does.
- `loglikelihood_rolling(text)`: every token of the text, after `<|endoftext|>`, in the windows of the harness's
  `get_rolling_token_windows` + `make_disjoint_window`. By default (`rolling_context="disjoint"`) each window
  sees only its own tokens: exactly `lm eval`'s non-overlapping windows (`window_spans` with no stride), so a text
  file given to both gets the same NLL and bits-per-byte (tests/test_harness.py). `rolling_context="full"` gives
  the last, partial window a full context of earlier tokens, as the harness's HF model does, so figures compare
  with HF models scored by the harness (the two differ only in that last window of each document).
- `generate_until(context, gen_kwargs)`: `lm.model.generation.generate_text`, the one decoder, batched per
  `gen_kwargs`: greedy unless the task sets `do_sample`, no repetition penalty (the harness scores the model, not
  `lm generate`'s sampling defaults), stopped by the task's `until` strings or `<|endoftext|>`, with the prompt
  left-truncated to leave room for `max_gen_toks` (the harness's HF convention).

Which distribution: the network's own softmax, by default, for a model with a context cache too (the default
recipe): what `lm eval`'s first row and `val/*` report, and what an exported (HF, ONNX) copy of the model would
score. `context_cache=True` scores, and generates from, the cache's mixture (`lm eval`'s `context cache` row).

`@register_model("lm")` makes the class the harness's model `lm` once this module is imported; the harness
has no plugin entry point, so its CLI is run through this module (`python -m lm.evaluation.harness ...`,
every `lm_eval` flag works).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Optional, Union

import lm_eval.models  # noqa: F401  the harness's own models first: get_model() only adds them to an empty registry
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from torch import nn

from lm.data.tokenizer import EOT, Tokenizer
from lm.errors import LMError, MissingFileError
from lm.io.checkpoints import load_model
from lm.model.generation import generate_text
from lm.model.sampling import SamplingOptions

log = logging.getLogger(__name__)

ROLLING_CONTEXTS = ("disjoint", "full")
HARNESS_DEFAULT_DEVICE = "cuda:0"  # lm_eval/config/evaluate_config.py: what its CLI passes when --device is left out
# gen_kwargs the adapter reads (the rest of a task's generation_kwargs are named in a warning, once per batch).
KNOWN_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@register_model("lm")
class LMHarnessModel(TemplateLM):
    """The harness's `LM` on an `lm` model: `LMHarnessModel(ckpt_path=...)` or `LMHarnessModel(model=..., tokenizer=...)`.

    Args (the harness's `--model_args` are these, e.g. `ckpt_path=last.ckpt,context_cache=True`):
        ckpt_path: Checkpoint written by `lm fit` (or quantize / prune / merge).
        model, tokenizer: An already loaded model and its tokenizer (instead of `ckpt_path`).
        batch_size: Requests per forward pass (the harness's `--batch_size`; "auto" is not supported).
        device: Where to run (default cpu).
        context_cache: Score and generate with the context cache's mixture instead of the network's softmax.
        rolling_context: "disjoint" (default: `lm eval`'s windows) or "full" (the harness's HF model's last window).
        max_gen_toks: New tokens per generation when the task does not say.
    """

    def __init__(self, ckpt_path: Optional[str] = None, *, model: Optional[nn.Module] = None,
                 tokenizer: Optional[Tokenizer] = None, batch_size: Union[int, str, None] = 8,
                 device: Optional[str] = None, context_cache: bool = False, rolling_context: str = "disjoint",
                 max_gen_toks: int = 256, max_batch_size: Optional[int] = None, **unknown: Any) -> None:
        # max_batch_size: passed by the harness for its "auto" batch size, which this model does not do.
        super().__init__()
        if unknown:  # `--model_args` typos would otherwise be a TypeError from deep inside the harness
            raise LMError(f"Unknown model_args for the lm model: {sorted(unknown)}; valid: ckpt_path, batch_size, "
                          f"device, context_cache, rolling_context, max_gen_toks.")
        if (ckpt_path is None) == (model is None):
            raise LMError("Pass the model as ckpt_path=<checkpoint> (e.g. --model_args ckpt_path=checkpoints/x/last.ckpt), "
                          "or, from Python, model= and tokenizer=.")
        if model is None:
            model, tokenizer = load_model(ckpt_path, device=_device(device))
        if tokenizer is None:
            raise LMError("LMHarnessModel(model=...) needs the model's tokenizer too (tokenizer=...).")
        if tokenizer.eot_id is None:
            raise LMError("This tokenizer has no <|endoftext|> token: the harness conditions a text's first token on "
                          "one. Use a checkpoint whose tokenizer has it (every tokenizer `lm fit` trains does).")
        if context_cache and not getattr(model, "accepts_context_cache", False):
            raise LMError("context_cache=True: this checkpoint has no context cache (its config has context_cache: "
                          "false); leave it out to score the network.")
        if rolling_context not in ROLLING_CONTEXTS:
            raise LMError(f"rolling_context must be one of {ROLLING_CONTEXTS}, got {rolling_context!r}.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = _batch_size(batch_size)
        self.context_cache, self.rolling_context, self.max_gen_toks = bool(context_cache), rolling_context, int(max_gen_toks)
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        """The context: the longest input a forward takes."""
        return self.model.config.max_position_embeddings

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)  # lm's tokenizers add no BOS: nothing to add or leave out

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # ----------------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-probability, greedy?) of each continuation after its context (ids from `TemplateLM.loglikelihood`)."""
        rows = []
        for (context, continuation), context_ids, continuation_ids in requests:
            if len(continuation_ids) > self.max_length:
                raise LMError(f"A continuation of {len(continuation_ids)} tokens is longer than the model's context "
                              f"({self.max_length}): the harness cannot score it ({continuation[:40]!r}...).")
            rows.append(((context_ids + continuation_ids)[-(self.max_length + 1):], len(continuation_ids)))
        truncated = sum(len(c) + len(n) > self.max_length + 1 for _, c, n in requests)
        if truncated:  # the harness's HF model warns about this too; once here, not per request
            log.warning("%d of %d requests are longer than the context (%d tokens): their contexts keep the last tokens.",
                        truncated, len(requests), self.max_length)
        return self._score_rows(rows)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text, every token scored once (see the module docstring for the windows)."""
        rows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                seen = len(continuation) if self.rolling_context == "disjoint" else self.max_length
                rows.append(((context + continuation)[-(seen + 1):], len(continuation)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score_rows(rows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): the summed log-probability of the last n tokens, each given the tokens before it,
        and whether each is the argmax. Longest rows first, a batch right-padded to its longest, one forward each."""
        options = {"context_cache": True} if self.context_cache else {}
        collator = Collator(rows, sort_fn=lambda row: (-len(row[0]), tuple(row[0])))
        results = []
        for batch in collator.get_batched(n=self.batch_size):
            inputs = torch.zeros(len(batch), max(2, *(len(tokens) for tokens, _ in batch)) - 1, dtype=torch.long)
            for i, (tokens, _) in enumerate(batch):
                inputs[i, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            logits = self.model(inputs.to(self._device), **options)
            for i, (tokens, n) in enumerate(batch):
                if n == 0:  # an empty continuation: probability 1 (and tokens[-0:] would be every token)
                    results.append((0.0, True))
                    continue
                # float32 log-softmax: in bf16 the small probabilities the score is made of round away
                log_probs = logits[i, len(tokens) - 1 - n:len(tokens) - 1].float().log_softmax(dim=-1)
                targets = torch.tensor(tokens[-n:], device=log_probs.device)
                logprob = log_probs.gather(-1, targets[:, None]).double().sum()
                results.append((float(logprob), bool((log_probs.argmax(dim=-1) == targets).all())))
        return collator.get_original(results)

    # -------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, through `generate_text` (the one decoder), batched per `gen_kwargs`."""
        collator = Collator([request.args for request in requests], group_by="gen_kwargs", group_fn=lambda args: args[1],
                            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]))
        results = []
        for batch in collator.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs = zip(*batch)
            options = self.sampling_options(all_gen_kwargs[0])
            # An empty context starts from <|endoftext|>, as the harness's loglikelihood does.
            results += generate_text(self.model, self.tokenizer, [c or EOT for c in contexts], options)
        results = collator.get_original(results)
        for request, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results

    def sampling_options(self, gen_kwargs: dict[str, Any]) -> SamplingOptions:
        """The harness's generation kwargs as `SamplingOptions`: greedy unless `do_sample`, no repetition penalty."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        ignored = sorted(set(kwargs) - KNOWN_GEN_KWARGS)
        if ignored:
            log.warning("lm's harness model ignores these generation kwargs: %s", ignored)
        max_new_tokens = kwargs["max_gen_toks"]
        if max_new_tokens >= self.max_length:
            raise LMError(f"The task asks for up to {max_new_tokens} new tokens (max_gen_toks) but the model's context is "
                          f"{self.max_length} tokens: lower it (lm_eval: --gen_kwargs max_gen_toks=N, N < {self.max_length}).")
        sampled = bool(kwargs.get("do_sample"))
        return SamplingOptions(
            max_new_tokens=max_new_tokens, temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
            top_k=kwargs.get("top_k") if sampled else None, top_p=kwargs.get("top_p") if sampled else None,
            stop=handle_stop_sequences(kwargs.get("until"), eos=EOT), truncate=True, context_cache=self.context_cache,
            repetition_penalty=1.0)


def _device(device: Optional[str]) -> str:
    """`device`, or cpu: also for "cuda:0" on a machine without CUDA, because that is the harness CLI's default
    (`--device` left out); any other device it lacks is an LMError from `load_model`, as everywhere in lm."""
    if device is None or (device == HARNESS_DEFAULT_DEVICE and not torch.cuda.is_available()):
        return "cpu"
    return device


def _batch_size(batch_size: Union[int, str, None]) -> int:
    """The harness passes `--batch_size` as given: a number, a numeric string, or "auto"."""
    if batch_size is None:
        return 8
    if isinstance(batch_size, str) and not batch_size.isdigit():
        raise LMError(f"batch_size {batch_size!r}: the lm model takes a number of requests per forward (e.g. 8); "
                      f"'auto' is not supported.")
    if int(batch_size) < 1:
        raise LMError(f"batch_size must be a positive number of requests, got {batch_size}.")
    return int(batch_size)


# ------------------------------------------------------------------------------- lm eval --harness_tasks
def task_manager(tasks: list[str], include_path: Optional[str] = None) -> TaskManager:
    """A `TaskManager` that knows `tasks`: the include path's own tasks alone when it holds them all (indexing
    the harness's ~15k built-in tasks takes seconds), else those and the built-in ones; an unknown task is an
    `LMError` naming the closest known ones."""
    if include_path is not None and not Path(include_path).is_dir():
        raise MissingFileError(f"--harness_include_path {include_path} is not a folder: pass the folder of your task YAMLs.")
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            raise LMError(f"Unknown harness task {task!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + ": `lm_eval ls tasks` lists them; your own task YAMLs go in --harness_include_path.")
    return manager


def evaluate_harness(model: nn.Module, tokenizer: Tokenizer, tasks: list[str], include_path: Optional[str] = None,
                     limit: Optional[int] = None, batch_size: int = 8, context_cache: bool = False,
                     log_samples: bool = False, bootstrap_iters: int = 100_000) -> dict[str, Any]:
    """Run harness `tasks` on an `lm` model; returns `simple_evaluate`'s results (the `results` section holds
    each task's metrics; `samples` the per-request responses when `log_samples`)."""
    if not tasks:
        raise LMError("No harness task given: pass --harness_tasks TASK[,TASK], e.g. --harness_tasks hellaswag,arc_easy.")
    if limit is not None and limit <= 0:
        raise LMError(f"--harness_limit must be a positive number of examples per task, got {limit}.")
    adapter = LMHarnessModel(model=model, tokenizer=tokenizer, batch_size=batch_size, context_cache=context_cache)
    return simple_evaluate(model=adapter, tasks=tasks, task_manager=task_manager(tasks, include_path), limit=limit,
                           log_samples=log_samples, bootstrap_iters=bootstrap_iters)


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of the results (what `lm_eval` prints)."""
    return make_table(results)


if __name__ == "__main__":  # `python -m lm.evaluation.harness ...`: the harness's CLI, with the model `lm` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
