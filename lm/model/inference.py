"""CPU decode speed-ups for a trained `GPT`, applied by `GPT.prepare_for_inference`.

The model itself (config.py, layers.py, gpt.py) uses plain `nn.Linear` and knows nothing of this
file. A decode step multiplies every weight matrix by one row per sequence, so it is bound by
streaming the weights from memory, and the kernel decides how close it gets to the memory bandwidth.
`prepare_for_inference(model, compile)`:

- swaps every plain `nn.Linear` for a `DecodeLinear` that holds the *same* Parameter objects (the
  state dict, tied embeddings and an optimizer built earlier are untouched). Without autograd, on
  CPU, for a few rows it takes a faster route than `F.linear`:
  - one row inside `torch.compile`: `(x * weight).sum(-1)`, which inductor fuses into one
    vectorized pass over the weight;
  - bf16 on a CPU with oneDNN bf16 kernels: a copy of the weight prepacked in oneDNN's blocked
    layout (a cache, dropped as soon as the weight changes);
  - fp32: `(weight @ x.T).T` with one row padded to two, which MKL runs with its matrix-matrix
    kernel instead of its slower matrix-vector one.
  For many fp32 rows (`lm eval`'s windows, a prompt's prefill) it multiplies by a copy of the weight
  prepacked in oneDNN's layout, where oneDNN is built in: on an AMD EPYC Zen 3 (AVX2) this ran the
  model's products 5-50% faster than `F.linear` (MKL), the 8,192-way LM head's the most
  (docs/results/eval-speed.md). The copy costs the weights' memory once more, as the bf16 one does.
  Many bf16 rows where oneDNN has no bf16 (AVX2) are multiplied in float32 and rounded back (`upcast_linear`):
  torch's bf16 product there is a reference kernel, ~5x slower for a prompt's prefill.
  With autograd on (training) it is `F.linear`, so a prepared model still trains correctly;
- `compile=True`: `GPT.decode` (the one-token step of generation) becomes a `torch.compile`d forward
  with the inductor options of `decode_compile_options`. Weights are not frozen into the compiled
  code, so it stays correct when they change; a new case (another dtype, a padding mask) recompiles.

Every private torch call of `lm` lives here, each in one small function that says which call and why.
Benchmark: `benchmarks/generate.py` (figures in the README).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.runtime.hardware import cpu_is_x86


# ------------------------------------------------------------------------ private torch calls
def onednn_bf16_supported() -> bool:
    """Private `torch.ops.mkldnn._is_mkldnn_bf16_supported`: whether oneDNN has bf16 kernels on this
    CPU (AVX-512 bw/vl/dq or AVX-NE-CONVERT). No public API tells, and on an AVX2-only CPU oneDNN's
    bf16 linear raises instead of falling back, so the packed route is used only where this is True."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_fp32_supported() -> bool:
    """Whether torch was built with oneDNN on an x86 CPU, where its fp32 kernels run on any CPU torch supports
    (the packed fp32 route of `DecodeLinear`; elsewhere, e.g. on Arm, oneDNN's fp32 linear was not measured)."""
    return torch.backends.mkldnn.is_available() and cpu_is_x86()


def onednn_pack_weight(weight: Tensor, rows: int = 1) -> Tensor:
    """Private `torch.ops.mkldnn._reorder_linear_weight`: a copy of a bf16 or fp32 weight in oneDNN's blocked
    layout (what inductor's weight-freezing pass makes), its blocking chosen for products of about `rows` rows.
    Without it oneDNN reorders the weight on every call, and eager bf16 decoding is slower than fp32."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def onednn_linear(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Private `torch.ops.mkldnn._linear_pointwise`: x @ W.T + b with a weight from `onednn_pack_weight`
    (the only op that takes it; "none" = no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


# ------------------------------------------------------------------------------- linear layer
class DecodeLinear(nn.Linear):
    """`nn.Linear` with faster CPU routes for decoding a few rows without autograd (see the module
    docstring). Built from an `nn.Linear`, it shares that layer's Parameters: same values, same
    state-dict keys, same ties."""

    SMALL_ROWS = 16  # up to this many rows a decode route beats F.linear
    MANY_ROWS = 512  # the product size an fp32 packed weight is blocked for (a 512-token window, a batch of them)

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects, no copy
        for name, value in vars(linear).items():  # e.g. is_residual_projection, training
            if not name.startswith("_"):
                setattr(self, name, value)
        self._packed: Optional[tuple[Tensor, Tensor, int]] = None  # (packed weight, its source, source version)

    def prepack(self) -> None:
        """Keep a copy of the weight packed in oneDNN's layout (a cache, not in the state dict): bf16 on a CPU
        with oneDNN bf16, for decoding; fp32 where oneDNN runs, for many rows (for a few, a packed fp32 weight
        was no faster than the padded product)."""
        weight = self.weight.detach()
        self._packed = None
        if weight.device.type != "cpu":
            return
        if weight.dtype == torch.bfloat16 and onednn_bf16_supported():
            self._packed = (onednn_pack_weight(weight), weight, weight._version)
        elif weight.dtype == torch.float32 and onednn_fp32_supported():
            self._packed = (onednn_pack_weight(weight, self.MANY_ROWS), weight, weight._version)

    def current_packed_weight(self) -> Optional[Tensor]:
        """The packed weight, or None if there is none or it is stale (then it is dropped).

        Stale means the weight was modified in place (an optimizer step, `load_state_dict`: the version
        counter moved) or replaced (`.to()`, a new Parameter: another memory address; the cache holds
        the old source, so its address cannot have been reused)."""
        if self._packed is not None:
            _, source, version = self._packed
            if self.weight.data_ptr() != source.data_ptr() or self.weight._version != version:
                self._packed = None
        return None if self._packed is None else self._packed[0]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if not (rows > 0 and x.device.type == "cpu" and not torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        if rows > self.SMALL_ROWS:
            if x.dtype == torch.float32 and self.has_packed_weight(x.dtype) and not torch.compiler.is_compiling():
                return onednn_linear(x, self._packed[0], self.bias)
            if x.dtype == torch.bfloat16 and not onednn_bf16_supported():
                return upcast_linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if rows == 1 and torch.compiler.is_compiling():
            return one_row_multiply_sum(x, self.weight, self.bias)
        if x.dtype == torch.bfloat16 and self.has_packed_weight(x.dtype):
            return onednn_linear(x, self._packed[0], self.bias)
        if x.dtype == torch.float32:
            return small_rows_matmul(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def has_packed_weight(self, dtype: torch.dtype) -> bool:
        """Whether a current (not stale) packed weight of `dtype` is there to multiply by."""
        packed = self.current_packed_weight()
        return packed is not None and packed.dtype == dtype


def one_row_multiply_sum(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear for one row, written so that inductor fuses it into one pass over the weight (the
    product is never materialized)."""
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y + bias if bias is not None else y


def upcast_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear of bf16 `x` as a float32 product, rounded back to bf16: where oneDNN has no bf16 (AVX2-only CPUs)
    torch multiplies many bf16 rows with a reference kernel, and a 400-token prefill of the 6 x 384 bench model
    took 1.0 s against 0.16-0.19 s this way (the weights' float32 copies are made per call: small against the
    product of that many rows). A few rows (decoding) keep bf16's own product, which streams half the bytes."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def small_rows_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear for a few fp32 rows as `(weight @ x.T).T`; one row is padded to two, since a single
    column sends MKL back to its slow matrix-vector kernel."""
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:
        x2 = x2.expand(2, -1).contiguous()
    y = (weight @ x2.T).T[:rows]
    y = y + bias if bias is not None else y.contiguous()
    return y.view(*x.shape[:-1], y.shape[-1])


def use_decode_linears(model: nn.Module) -> None:
    """Replace every plain `nn.Linear` of `model` by a `DecodeLinear` sharing its Parameters.

    Subclasses of `nn.Linear` (e.g. a researcher's LoRA layer) keep their own forward, and layers
    already swapped are left alone, so calling this twice changes nothing. Forward hooks registered
    on a swapped layer are not carried over."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, DecodeLinear(child))


# -------------------------------------------------------------------------- compiled decoding
def decode_compile_options(device: torch.device) -> dict:
    """Inductor options for the compiled decode step (scoped to that one compile; training is unaffected).

    - cpp_wrapper: the kernels are called from C++, not Python: a decode step is a few milliseconds,
      of which Python's launch overhead would be a noticeable part.
    - on CPU, realize_acc_reads_threshold=1: store every pointwise result that reads more than one
      buffer instead of inlining it into its consumer. Without it inductor recomputes a linear layer's
      input (residual adds, LayerNorm) inside the multiply-sum loop of `one_row_multiply_sum`, once per
      output row (vocabulary-many times for the LM head), and in bf16 on a CPU without native bf16
      each recomputation also converts bf16 to fp32 again. (GPUs use `F.linear` there: not needed.)
    """
    options: dict = {"cpp_wrapper": True}
    if device.type == "cpu":
        options["realize_acc_reads_threshold"] = 1
    return options


def compile_decode_step(model: nn.Module) -> Callable[..., Tensor]:
    """`model.forward` compiled for decoding; dynamic shapes, so a growing KV cache does not recompile.

    `isolate_recompiles`: this model's compiled graphs are its own. By default every `torch.compile` of
    `GPT.forward` in a process shares one set of entries (the code object's): after other models were compiled
    (a notebook, a test session, an int8 copy beside its fp32 original) this model's step then counted against
    their recompile limit, and a guard-skipping step (`skipping_guards`) looked among their graphs, found none
    and raised "Recompilation triggered with skip_guard_eval_unsafe stance". (torch 2.13 has the option; older
    versions compile without it.)"""
    device = next(model.parameters()).device
    own_graphs = "isolate_recompiles" in inspect.signature(torch.compile).parameters
    return torch.compile(model.forward, dynamic=True, options=decode_compile_options(device),
                         **({"isolate_recompiles": True} if own_graphs else {}))


# Steps since the decoder's rows or columns last changed after which a compiled step skips dynamo's guards.
# Step 1 may compile a graph specialized to its sizes (a cache length of 1 is specialized, not symbolic);
# step 2 then recompiles for a symbolic length, so from step 3 on the generic graph serves every step.
GUARD_FREE_AFTER_STEPS = 2


def skipping_guards(steady: bool) -> contextlib.AbstractContextManager:
    """Around one compiled decode step: when `steady`, evaluate only the guards that tell the compiled
    graphs apart (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`), not all of them.

    A decode step's guards check every weight, the cache's attributes and the sizes again on every
    token: ~0.18 ms per step on 2 Zen 4 cores, 12% of a compiled bf16 step of the 6x384 bench model. In
    the steady state of one generation (the same rows, the same mask or none, only the cache length
    growing) nothing they check changes, which is the case the stance exists for; `Decoder` passes
    `steady` only from its `GUARD_FREE_AFTER_STEPS + 1`-th step after any change of rows or columns, so
    every new situation is fully guarded (and recompiled if needed) first."""
    if not steady:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def prepare_for_inference(model: nn.Module, compile: bool = False) -> nn.Module:
    """Swap in `DecodeLinear`s, prepack bf16 weights where oneDNN can use them and, with `compile`,
    set `model.decode_step` to the compiled forward (None otherwise). Returns `model`.

    Idempotent; call it again after changing dtype or device (a stale packed weight is dropped, not
    used, but then it is not re-made either). Logits equal the plain model's to float rounding."""
    use_decode_linears(model)
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            module.prepack()
    model.decode_step = compile_decode_step(model) if compile else None
    return model
