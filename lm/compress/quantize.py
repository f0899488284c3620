"""Post-training int8 quantization of a GPT's linear layers (`lm quantize`).

- `Int8Linear`: int8 weights with one fp32 scale per output row (symmetric), fp32 bias. The product
  takes the fastest correct route for where it runs (`int8_route`):
  - eager, on an x86 CPU: the quantized engine's dynamic-int8 kernel (fbgemm behind torch's default
    "x86" engine): activations quantized per call, int8 x int8 -> int32, rescaled. Activations get the
    full 8 bits on CPUs with AVX-512 VNNI (its int8 multiply-add accumulates in int32) and 7 bits
    (`reduce_range`) elsewhere, where AVX2's 16-bit pair sums would saturate;
  - inside `torch.compile` (the decode step of `prepare_for_inference(compile=True)`, i.e.
    `lm generate --compile`), one row: weight-only int8, `(x * w_int8).sum(-1) * scale`, which inductor
    fuses into one vectorized pass over the int8 weights (fp32 activations, no quantization step);
  - anywhere else (no quantized engine, another device): dequantize + `F.linear` (same weights).
- `Int8Embedding`: the token lookup of a *tied* model reads the LM head's int8 rows (row i of the
  head is the embedding of token i, and the scales are per row), so tying survives quantization and
  the matrix is stored once, in int8.
- `quantize_model(model)` swaps them in; `QUANTIZATION_KEY` in a checkpoint's hyper-parameters tells
  `lm.io.checkpoints.load_model` to do the same swap before loading the int8 state dict. The checkpoint
  holds int8 values and scales only: the route is chosen where it is loaded, not where it was made.
- `quantize(...)`: the `lm quantize` verb: checkpoint in, quantized checkpoint out.

Norms, position tables and biases stay fp32 (a few KB; quantizing them saves nothing and costs accuracy).

Why the quantized engine through `torch.ops.quantized` (the kernels behind the deprecated
`torch.ao.quantization.quantize_dynamic`) and not torchao: decoding multiplies one row at a time, and
torchao's CPU int8 kernels (`_weight_int8pack_mm`, `_int_mm`) are built for many rows: at batch 1 they
decoded slower than fp32, where the quantized engine's dynamic kernel decodes faster, eager and compiled,
with and without AVX-512 VNNI. "x86" (torch's default engine, fbgemm for linear layers) is chosen over
"onednn", which was slower. The figures, with the commands and CPUs: docs/results/compression.md. If a
future torch drops the quantized ops, `Int8Linear` falls back to dequantize + `F.linear` (same results,
no speed-up).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.model.inference import one_row_multiply_sum
from lm.runtime import hardware

_LINEAR_DYNAMIC = getattr(getattr(torch.ops.quantized, "linear_dynamic", None), "default", None)
QUANTIZATION_KEY = "quantization"  # hyper_parameters[QUANTIZATION_KEY] = {"method": "int8", ...}
METHOD = "int8-dynamic"


@lru_cache(maxsize=1)
def int8_route() -> tuple[Optional[str], bool]:
    """(quantized engine, reduce_range) for eager int8 products on the CPU this runs on; engine None = no int8
    kernel (dequantize + F.linear). "x86" is torch's default engine on x86 (fbgemm for linear layers)."""
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm") if e in engines), None)
    if _LINEAR_DYNAMIC is None or not hasattr(torch, "_make_per_channel_quantized_tensor"):
        engine = None
    return engine, not hardware.cpu_has_avx512_vnni()


@contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """Prepack under `engine` (it decides the packed format) without changing the process's engine."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per-output-row scales). Inference only.

    Buffers `weight_int8` (out, in) and `weight_scale` (out,) are what the state dict holds; the
    fbgemm-packed copy used on CPU is a cache rebuilt after a load or a move."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: Optional[tuple[object, tuple, bool]] = None  # (packed weight, its source, reduce_range)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_rows(linear.weight.detach().float())
        module.weight_int8.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach().float())
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None])

    def _pack(self, engine: str, reduce_range: bool) -> object:
        """The weight in the engine's packed format (a cache: `_packed` also keeps what it was made from)."""
        zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        with warnings.catch_warnings(), _quantized_engine(engine):
            # torch announces the removal of quantized tensor types; the prepack still takes one,
            # and it remains the fastest int8 CPU kernel here (see the module docstring).
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale.double(),
                                                               zero_points, 0)
            bias = None if self.bias is None else self.bias.detach().float()
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self._packed = (packed, self._source(), reduce_range)
        return packed

    def _source(self) -> tuple:
        """What the packed copy was made from: the tensors themselves (a `.to()` or a new buffer replaces
        them; holding them also keeps their memory from being reused) and their version counters (an
        in-place change, e.g. `load_state_dict`, bumps them)."""
        w, s, b = self.weight_int8, self.weight_scale, self.bias
        return (w, s, b, w._version, s._version, -1 if b is None else b._version)

    def forward(self, x: Tensor) -> Tensor:
        # The hot path of eager decoding (every linear layer, every token): is the packed copy current,
        # then the kernel. At batch 1 the kernel's cost is small and fixed, so Python work around it is a
        # visible share of a decode step: one identity/version check, then the resolved overload directly.
        packed = self._packed
        if packed is not None and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            (w, s, b, wv, sv, bv), bias = packed[1], self.bias
            if (w is self.weight_int8 and s is self.weight_scale and b is bias and wv == w._version
                    and sv == s._version and bv == (-1 if bias is None else bias._version)):
                return _LINEAR_DYNAMIC(x, packed[0], packed[2])
        return self._forward_other(x)

    def _forward_other(self, x: Tensor) -> Tensor:
        """First call, changed weights, compile, other dtypes and devices."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.compiler.is_compiling():  # the packed op would break the graph: int8 weights, fp32 math
            if x.numel() == x.shape[-1]:
                y = one_row_multiply_sum(x, self.weight_int8, None) * self.weight_scale.to(x.dtype)
                return y if bias is None else y + bias
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        engine, reduce_range = int8_route()
        if x.dtype == torch.float32 and engine is not None and x.device.type == self.weight_int8.device.type == "cpu":
            return _LINEAR_DYNAMIC(x, self._pack(engine, reduce_range), reduce_range)
        self._packed = None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int8Embedding(nn.Module):
    """Token lookup from a tied `Int8Linear` head: row i dequantized = embedding of token i.

    The head is held outside the module tree (not a submodule) so its buffers appear once in the
    state dict, under `lm_head.`."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        object.__setattr__(self, "_head", head)

    @property
    def weight(self) -> Tensor:
        """The effective (dequantized) float embedding matrix, for code that reads `embed_tokens.weight`
        for its device, dtype or size (e.g. `GPT.new_kv_cache`). Computed on each access, in the
        model's float type (the scales', which `model.to(dtype)` converts: fp32, or bf16 for
        `lm generate --dtype bfloat16`)."""
        return self._head.dequantized_weight(self._head.weight_scale.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        head = self._head
        scale = head.weight_scale[ids].unsqueeze(-1)
        return head.weight_int8[ids].to(scale.dtype) * scale  # the model's float type, not always fp32


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: q = round(w / s), s = max|row| / 127 (an all-zero row gets s = 1)."""
    scale = weight.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_model(model: nn.Module, skeleton: bool = False) -> nn.Module:
    """Replace every `nn.Linear` of `model` by an `Int8Linear` (in place; returns the model).

    A tied LM head (`model.lm_head.weight is model.embed_tokens.weight`) is quantized once and the
    embedding lookup reads it (`Int8Embedding`). `skeleton=True` builds the int8 modules without
    quantizing (the weights are about to be loaded from a quantized checkpoint).
    """
    head, embed = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    tied = isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding) and head.weight is embed.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                new = (Int8Linear(child.in_features, child.out_features, child.bias is not None) if skeleton
                       else Int8Linear.from_linear(child))
                setattr(parent, name, new)
    if tied:
        model.embed_tokens = Int8Embedding(model.lm_head)
    return model.eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights (int8 values + scales, or float weights), each tensor once."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = ([module.weight_int8, module.weight_scale] if isinstance(module, Int8Linear)
                   else [module.weight] if isinstance(module, nn.Linear) else [])
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total
