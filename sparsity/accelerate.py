"""Run eligible layers on real sparse kernels: 2:4 semi-structured or BSR, built on ``torch.sparse`` directly.

``accelerate_(model, backend)`` swaps each eligible ``nn.Linear`` (masked or plain) for a :class:`SparseLinear`
holding the sparse weight, and each eligible 1x1 ``nn.Conv2d`` (a matmul over channels: ResNet bottlenecks and
downsamples, pointwise convs) for a :class:`SparseConv1x1`; it leaves everything else dense and returns one row per
Linear/Conv2d saying what runs sparse and why the rest does not. Nothing changes unless the layer sits on a CUDA GPU
of compute capability 8.0+ (Ampere, Hopper, ...): that is where ``torch.sparse``'s semi-structured tensors
(cuSPARSELt or CUTLASS, the one ``to_sparse_semi_structured`` would pick unless ``semi_kernel`` says) and the Triton
BSR kernels run. Converted layers are for inference only (no gradients, not saved in ``state_dict``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MaskedMixin
from .masks import is_nm
from .surgery import set_submodule

__all__ = ["SparseLinear", "SparseConv1x1", "accelerate_", "plan_acceleration", "layer_backend", "BACKENDS",
           "SEMI_KERNELS"]

_logger = logging.getLogger(__name__)

BACKENDS = ("semi_structured", "bsr")
#: 2:4 kernels: torch's default choice, or one forced (they differ in shape multiples and speed per GPU and shape)
SEMI_KERNELS = ("auto", "cusparselt", "cutlass")
MIN_CAPABILITY = (8, 0)
_NEED_GPU = "these kernels need a CUDA GPU of compute capability 8.0+"


@torch.library.custom_op("sparsity::bsr_mm", mutates_args=())
def _bsr_mm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int,
            dense: torch.Tensor) -> torch.Tensor:
    """``W @ dense`` for the BSR weight (rows x dense.shape[0]) held as its three dense component tensors.

    An opaque op to ``torch.compile``: dynamo cannot trace sparse tensors and broke the graph at every BSR layer
    (a ViT-B with 48 of them ran mostly eagerly under "compiled"); it traces this op as one node instead.
    """
    weight = torch.sparse_bsr_tensor(crow, col, values, size=(rows, dense.shape[0]), check_invariants=False)
    return weight @ dense


@_bsr_mm.register_fake
def _(crow, col, values, rows, dense):
    return dense.new_empty((rows, dense.shape[1]))


@torch.library.custom_op("sparsity::bsr_mm_t", mutates_args=())
def _bsr_mm_t(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, cols: int,
              grad: torch.Tensor) -> torch.Tensor:
    """``W^T @ grad``: the input gradient of :func:`_bsr_mm`, through a dense copy of W (inference is the point;
    this only keeps autograd through a converted layer correct)."""
    weight = torch.sparse_bsr_tensor(crow, col, values, size=(grad.shape[0], cols), check_invariants=False).to_dense()
    return weight.t() @ grad


@_bsr_mm_t.register_fake
def _(crow, col, values, cols, grad):
    return grad.new_empty((cols, grad.shape[1]))


def _bsr_mm_setup(ctx, inputs, output) -> None:
    crow, col, values, rows, dense = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.cols = dense.shape[0]


def _bsr_mm_backward(ctx, grad):
    crow, col, values = ctx.saved_tensors
    return None, None, None, None, _bsr_mm_t(crow, col, values, ctx.cols, grad)


_bsr_mm.register_autograd(_bsr_mm_backward, setup_context=_bsr_mm_setup)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` a semi-structured (2:4) or BSR sparse tensor; any leading dims.

    The kernels take 2-D input, so leading dims are flattened and restored. Input is cast to the weight's dtype
    and the output back to the input's dtype (run the whole model in that dtype to avoid the casts).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int,
                 backend: str, pattern: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.pattern = backend, pattern
        self.dtype = weight.dtype
        if backend == "bsr":
            # the components the forward passes to the opaque op; dynamo cannot wrap views whose base is a sparse
            # tensor, so they get their own storage and the BSR weight is rebuilt on it (no second copy is kept)
            self._bsr = (weight.crow_indices().clone(), weight.col_indices().clone(), weight.values().clone())
            weight = torch.sparse_bsr_tensor(*self._bsr, size=weight.shape, check_invariants=False)
        # plain attributes on purpose: sparse tensor subclasses do not survive state_dict / .to() round trips
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # (B*, in)
        if self.backend == "semi_structured":
            y = F.linear(x2, self.weight, self.bias)  # (B*, out)
        else:  # BSR: sparse @ dense is the supported direction
            y = _bsr_mm(*self._bsr, self.out_features, x2.t()).t()
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, " \
               f"pattern={self.pattern}, dtype={self.dtype}"

    def example_input(self) -> torch.Tensor:
        """A zero input of 64 rows (the conversion's trial forward; 64 rows also take BSR's Triton path)."""
        return torch.zeros(64, self.in_features, device=self.weight.device, dtype=self.dtype)


class SparseConv1x1(SparseLinear):
    """A 1x1 ``Conv2d`` (groups 1, no padding) as the sparse matmul it is: every pixel's channels times ``W^T``.

    The input is seen as (N, H, W, C) rows (strided first), which is free for a channels-last input and one copy
    otherwise. The 2:4 output is NCHW in channels-last memory, which the next channels-last layer reads as is; BSR
    computes W X^T, so its output has the channels outermost in memory.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_channels: int, out_channels: int,
                 backend: str, pattern: str = "", stride: tuple[int, int] = (1, 1)) -> None:
        super().__init__(weight, bias, in_channels, out_channels, backend, pattern)
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self.stride != (1, 1):
            x = x[..., ::self.stride[0], ::self.stride[1]]
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}"

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, self.in_features, 8, 8, device=self.weight.device, dtype=self.dtype)


def _device_problem(weight: torch.Tensor, backend: str, semi_kernel: str) -> str | None:
    if not torch.cuda.is_available():
        return f"{_NEED_GPU} (no CUDA device here)"
    if weight.device.type != "cuda":
        return f"{_NEED_GPU}; the layer is on {weight.device.type}: move the model to the GPU first"
    cap = torch.cuda.get_device_capability(weight.device)
    if cap < MIN_CAPABILITY:
        return f"{_NEED_GPU}; {torch.cuda.get_device_name(weight.device)} is {cap[0]}.{cap[1]}"
    return _kernel_problem(cap, backend, semi_kernel)


def _kernel_problem(cap: tuple[int, int], backend: str, semi_kernel: str) -> str | None:
    """What stops the chosen 2:4 kernel on a GPU of capability ``cap`` (sm80+ already checked)."""
    if backend != "semi_structured":
        return None
    if semi_kernel == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt; use semi_kernel='cutlass' or 'auto'"
    kernel = semi_structured_class(semi_kernel).__name__
    if kernel.endswith("CUTLASS") and cap[0] != 8:
        # torch's CUTLASS 2:4 GEMM is built for sm8x only: it converts fine, then its first forward raises
        hint = "use semi_kernel='cusparselt'" if semi_kernel == "cutlass" else "this torch build has no cuSPARSELt"
        return f"torch's CUTLASS 2:4 kernel runs on compute capability 8.x only, this GPU is {cap[0]}.{cap[1]} ({hint})"
    return None


def semi_structured_class(kernel: str = "auto") -> type:
    """The ``torch.sparse`` 2:4 tensor class for ``kernel``; ``auto`` is torch's own pick (cuSPARSELt unless
    ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set or this build has no cuSPARSELt)."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    if kernel not in SEMI_KERNELS:
        raise ValueError(f"semi_kernel must be one of {', '.join(SEMI_KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        cutlass = SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available()
        kernel = "cutlass" if cutlass else "cusparselt"
    return SparseSemiStructuredTensorCUTLASS if kernel == "cutlass" else SparseSemiStructuredTensorCUSPARSELT


def _semi_structured_min_shape(dtype: torch.dtype, kernel: str = "auto") -> tuple[int, int]:
    """(rows, cols) multiples the weight needs for the semi-structured kernel that will run."""
    cls = semi_structured_class(kernel)
    cfg = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    return (cfg.sparse_min_rows, cfg.sparse_min_cols) if cfg else (32, 64)


def layer_backend(layer: MaskedMixin) -> str:
    """The kernel family a masked layer's pattern calls for: ``bsr`` for block-sparse (tiled) slices, else
    ``semi_structured`` (N:M)."""
    return "bsr" if any(s.tile for s in layer.slices) else "semi_structured"


def _plain(mod: nn.Module) -> bool:
    """A Linear/Conv2d whose forward is the stock one (or our masked one): subclasses with their own forward (timm's
    StdConv2d standardizes its weight, Conv2dSame pads) are not the matmul their weight suggests."""
    return type(mod) in (nn.Linear, nn.Conv2d) or isinstance(mod, MaskedMixin)


def _is_matmul_conv(mod: nn.Module) -> bool:
    """A Conv2d that is a matmul over channels: 1x1 kernel, one group, no padding (any stride)."""
    if not (isinstance(mod, nn.Conv2d) and _plain(mod) and tuple(mod.kernel_size) == (1, 1) and mod.groups == 1):
        return False
    return mod.padding in ("valid", "same") if isinstance(mod.padding, str) else tuple(mod.padding) == (0, 0)


def _matrix(w: torch.Tensor) -> torch.Tensor:
    """A Linear's weight, or a 1x1 conv's as the (out, in) matrix it multiplies by."""
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def _pattern(mod: nn.Module) -> str:
    """The mask's pattern, or for a plain layer (a densified export) what its zeros show: 2:4 or dense."""
    if isinstance(mod, MaskedMixin):
        return mod.pattern_label()
    if (isinstance(mod, nn.Linear) or _is_matmul_conv(mod)) and mod.weight.shape[1] % 4 == 0 \
            and is_nm(_matrix(mod.weight) != 0, 2, 4, dim=1):
        return "2:4 (from its zeros)"
    return "dense"


@torch.no_grad()
def pattern_problem(mod: nn.Module, backend: str, dtype: torch.dtype, blocksize: int | None,
                    semi_kernel: str = "auto") -> tuple[str | None, str]:
    """(why the pattern/shape/dtype cannot run on ``backend`` or None, a note for the table)."""
    if not _plain(mod):
        return f"{type(mod).__name__}: its own forward (not the plain matmul/conv of its weight) stays dense", ""
    if not isinstance(mod, nn.Linear) and not _is_matmul_conv(mod):
        if tuple(mod.weight.shape[2:]) == (1, 1):
            return (f"1x1 Conv2d with groups={mod.groups}, padding={mod.padding}: only a plain 1x1 conv (one group, "
                    "no padding) is a matmul over channels"), ""
        return "Conv2d: no commodity sparse conv kernel (would need im2col)", ""
    masked = isinstance(mod, MaskedMixin)
    out_f, in_f = _matrix(mod.weight).shape
    if backend == "semi_structured":
        if dtype not in (torch.float16, torch.bfloat16):
            return f"2:4 kernels need float16/bfloat16, asked for {str(dtype).removeprefix('torch.')}", ""
        # the ground truth is the mask itself (or the values of a plain, e.g. densified, layer)
        keep = _matrix(mod.weight_mask if masked else mod.weight != 0)
        if not is_nm(keep, 2, 4, dim=1):
            slices = getattr(mod, "slices", ())
            if slices and all((s.n, s.m, s.sparse_dim) == (2, 4, "row") for s in slices) and \
                    sum(s.stop - s.start for s in slices) == mod.weight.shape[0]:  # 2:4 asked for every row
                return f"its mask does not conform to its pattern {_pattern(mod)} (check it: validate.py " \
                       "--require-conformance)", ""
            return f"pattern {_pattern(mod)} is not 2:4 along the input dim (no commodity kernel for it)", ""
        rows, cols = _semi_structured_min_shape(dtype, semi_kernel)
        if out_f % rows or in_f % cols:
            kernel = semi_structured_class(semi_kernel).BACKEND
            return f"shape {out_f}x{in_f}: the {kernel} 2:4 kernel needs rows a multiple of {rows}, cols of {cols}", ""
        finer = [s.pattern() for s in getattr(mod, "slices", ()) if s.n is not None and (s.n, s.m) != (2, 4)]
        note = f"{'/'.join(sorted(set(finer)))} runs as 2:4 (at most the 2:4 speedup)" if finer else ""
        return None, note
    # bsr
    tiles = {s.tile for s in getattr(mod, "slices", ()) if s.tile}
    tile = blocksize or (tiles.pop() if len(tiles) == 1 else None)
    if tile is None:
        return ("no block pattern (BSR needs a block-sparse layer: a rule with tile, or blocksize=)" if not tiles
                else f"slices use different tiles {sorted(tiles)}"), ""
    if tile < 16 or tile & (tile - 1):
        return f"tile {tile}: the Triton BSR kernels need a power-of-two tile >= 16", ""
    if out_f % tile or in_f % tile:
        return f"shape {out_f}x{in_f} is not divisible by tile {tile}", ""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"BSR kernels need float16/bfloat16/float32, asked for {dtype}", ""
    w = _matrix(mod.weight * mod.weight_mask if masked else mod.weight)
    kept = float((w.reshape(out_f // tile, tile, in_f // tile, tile) != 0).any(3).any(1).float().mean())
    note = f"tile {tile}, {kept:.0%} of tiles kept" + (" (BSR rarely beats dense above ~30%)" if kept > 0.3 else "")
    return None, note


@torch.no_grad()
def plan_acceleration(model: nn.Module, backend: str = "semi_structured", dtype: torch.dtype = torch.bfloat16,
                      blocksize: int | None = None, semi_kernel: str = "auto") -> list[dict[str, Any]]:
    """The pre-flight of :func:`accelerate_`: one row per Linear/Conv2d, nothing changed.

    Rows: ``fqn``, ``shape``, ``pattern``, ``eligible`` (would convert), ``converted`` (False here), ``reason``
    (every problem found: device, dtype, pattern, shape multiples, block divisibility; or what will run).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if semi_kernel not in SEMI_KERNELS:
        raise ValueError(f"semi_kernel must be one of {', '.join(SEMI_KERNELS)}, got {semi_kernel!r}")
    rows = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, SparseLinear):  # SparseConv1x1 included
            rows.append({"fqn": fqn, "shape": [mod.out_features, mod.in_features], "pattern": mod.pattern,
                         "eligible": False, "converted": True, "reason": f"already converted ({mod.backend})"})
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        problem, note = pattern_problem(mod, backend, dtype, blocksize, semi_kernel)
        device = _device_problem(mod.weight, backend, semi_kernel)
        runs = f"{backend}" + (f" ({note})" if note else "")
        if problem:
            reason = "; ".join(p for p in (device, problem) if p)
        elif device:
            reason = f"{device}; otherwise eligible: would run {runs}"
        else:
            reason = f"runs {runs}"
        rows.append({"fqn": fqn, "shape": list(mod.weight.shape), "pattern": _pattern(mod),
                     "eligible": problem is None and device is None, "converted": False, "reason": reason})
    return rows


def _to_sparse(mod: nn.Linear | nn.Conv2d, backend: str, dtype: torch.dtype, blocksize: int | None,
               semi_kernel: str = "auto") -> SparseLinear:
    w = _matrix(mod.weight * mod.weight_mask if isinstance(mod, MaskedMixin) else mod.weight).detach().to(dtype)
    bias = None if mod.bias is None else mod.bias.detach().to(dtype)
    if backend == "semi_structured":
        sparse = semi_structured_class(semi_kernel).from_dense(w.contiguous())
    else:
        tiles = {s.tile for s in getattr(mod, "slices", ()) if s.tile}
        tile = blocksize or tiles.pop()
        sparse = w.to_sparse_bsr((tile, tile))
    if isinstance(mod, nn.Conv2d):
        return SparseConv1x1(sparse, bias, w.shape[1], w.shape[0], backend, _pattern(mod), mod.stride)
    return SparseLinear(sparse, bias, w.shape[1], w.shape[0], backend, _pattern(mod))


@torch.no_grad()
def accelerate_(model: nn.Module, backend: str = "semi_structured", dtype: torch.dtype = torch.bfloat16,
                blocksize: int | None = None, semi_kernel: str = "auto") -> list[dict[str, Any]]:
    """Swap eligible Linear layers for :class:`SparseLinear` and 1x1 convs for :class:`SparseConv1x1` on
    ``backend``, in place (run a conv net channels-last: the 1x1 convs then read and write without copies).

    Args:
        model: a masked model (patterns come from each layer's slices and ``weight_mask``) or a plain one (a
            Linear whose nonzeros are 2:4 along the input dim runs ``semi_structured``; ``bsr`` needs
            ``blocksize`` for plain layers). Move it to the GPU first, ideally already in ``dtype``.
        backend: ``semi_structured`` (2:4, fp16/bf16, sm80+) or ``bsr`` (block-sparse, power-of-two tile >= 16).
        dtype: dtype of the converted weights.
        blocksize: BSR tile; default the layer's slice tile.
        semi_kernel: ``auto`` (torch's choice), ``cusparselt`` or ``cutlass`` for the 2:4 backend.

    Returns:
        The :func:`plan_acceleration` rows with ``converted`` set: what now runs sparse, and why the rest does
        not. On CPU, or a GPU below compute capability 8.0, nothing changes and every reason says so.
    """
    rows = plan_acceleration(model, backend, dtype, blocksize, semi_kernel)
    for row in rows:
        if not row["eligible"]:
            continue
        mod = model.get_submodule(row["fqn"])
        try:
            sparse = _to_sparse(mod, backend, dtype, blocksize, semi_kernel)
            # one forward before the swap: a kernel constraint the pre-flight does not know refuses here, not in
            # the user's first forward; 64 rows also take BSR's Triton path (rows a multiple of the tile) and warm it
            sparse(sparse.example_input())
        except (RuntimeError, ValueError) as e:  # a kernel constraint the pre-flight did not know about
            row["reason"] = f"conversion failed: {' '.join(str(e).split())[:200]}"
            continue
        set_submodule(model, row["fqn"], sparse)
        row["converted"] = True
    done = sum(r["converted"] for r in rows)
    _logger.info("accelerate_(%s): %d of %d layers run sparse", backend, done, len(rows))
    return rows
