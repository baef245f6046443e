"""Inference throughput: the same model dense (masks baked in) vs after :func:`accelerate_`, measured.

Library half of ``benchmark.py --bench infer``: no argparse, no printing. Nothing is computed from a theoretical
model; on CPU or a GPU below sm80 the "sparse" model is the dense one and the figures say so (``converted`` 0,
speedup near 1).

- :func:`bench_infer` times whole forwards for every (dtype, batch size, eager/compiled) and reports median
  latency, throughput, peak memory and the largest logit difference against the masked dense model.
- :func:`bench_layers` times the MLP linears alone (``F.linear`` on the dense weight against the sparse kernel) at
  the input sizes the whole model feeds them.
- :func:`sparse_model` builds a timm model with magnitude masks from a short spec (``ff`` at 2:4, or 90 % in
  64x64 tiles), for benchmarking architectures without a trained checkpoint.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accelerate import SparseLinear, accelerate_, layer_backend, semi_structured_class
from .data import fixed_img_size
from .distributed import pick_device
from .errors import UserError
from .layers import masked_modules, to_channels_last
from .surgery import densify_
from .targets import find_candidates

__all__ = ["bench_infer", "bench_layers", "sparse_model", "time_calls", "resolve_model",
           "default_backend"]

MODES = ("eager", "compiled")


def time_calls(fns: Sequence[Callable[[], Any]], device: torch.device | str, warmup: int = 10,
               iters: int = 50) -> list[float]:
    """Median milliseconds of each of ``fns()`` (CUDA events on GPU, perf_counter on CPU), timed in turns: round
    k calls every function once, after ``warmup`` untimed rounds. A change of load on the machine then moves all
    of them alike instead of one, so their ratio holds (timed one after the other, a stall during the first
    could make the second look 70x faster)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
    return [sorted(t)[len(t) // 2] for t in times]


@torch.no_grad()
def sparse_model(arch: str, targets: Sequence[str] = ("ff",), nm: tuple[int, int] | None = (2, 4),
                 sparsity: float | None = None, tile: int | None = None, seed: int = 0, **create_kwargs) -> nn.Module:
    """``arch`` with magnitude masks on ``targets``: N:M (``nm``) or, with ``tile``, block sparsity ``sparsity``.

    The weights are timm's random initialisation (nothing is downloaded); the masks are what the methods' own
    one-shot magnitude prune gives (``oneshot`` for N:M, ``gmp`` at its final sparsity for blocks and
    unstructured), so every selected layer has exactly the pattern asked for and its pruned weights are zero.
    Targets are the recipe's (``ff``, ``qkv``, ``q``/``k``/``v``, ``proj``, ``conv``, ``re:...``).
    """
    from .controller import SparsityController
    from .factory import create_model
    from .recipe import recipe_from_dict

    if tile is not None:
        rule = {"target": list(targets), "sparsity": 0.9 if sparsity is None else sparsity, "tile": tile}
        spec = {"method": "gmp", "rules": [rule]}
    elif sparsity is not None:
        spec = {"method": "gmp", "rules": [{"target": list(targets), "sparsity": sparsity}]}
    else:
        n, m = nm or (2, 4)
        spec = {"method": "oneshot", "rules": [{"target": list(targets), "n": n, "m": m}]}
    recipe = recipe_from_dict(spec, source="benchmark --targets")
    torch.manual_seed(seed)
    model = create_model(arch, recipe=recipe, **create_kwargs)
    SparsityController(model, recipe, total_steps=1).finalize()  # final masks now, frozen from here on
    return model.eval()


def resolve_model(model_or_name: nn.Module | str | os.PathLike,
                  create_kwargs: dict | None = None) -> tuple[nn.Module, str]:
    """``(model, name)`` for a model, a timm name, a checkpoint or an export (loaded once: pass the model on)."""
    if isinstance(model_or_name, nn.Module):  # timm models know their name; others are named by their class
        cfg = getattr(model_or_name, "pretrained_cfg", None) or {}
        return model_or_name, cfg.get("architecture") or type(model_or_name).__name__
    import timm

    name = str(model_or_name)
    if timm.is_model(name):
        from .factory import create_model  # timm's errors for bad kwargs as one line

        return create_model(name, **(create_kwargs or {})), name
    from .export import load_for_eval

    model, meta = load_for_eval(name)
    return model, meta["arch"]


def default_backend(model: nn.Module) -> str:
    """``bsr`` for a model with block-sparse (tiled) layers, else ``semi_structured``."""
    return "bsr" if any(layer_backend(layer) == "bsr" for _, layer in masked_modules(model)) else "semi_structured"


def default_img_size(model: nn.Module) -> int:
    return fixed_img_size(model) or int((getattr(model, "pretrained_cfg", None) or {}).get("input_size",
                                                                                          (3, 224, 224))[-1])


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, sparse layouts included (BSR components, packed 2:4 values + metadata)."""
    if t.layout == torch.sparse_bsr:
        return sum(_tensor_bytes(p) for p in (t.crow_indices(), t.col_indices(), t.values()))
    # SparseSemiStructuredTensor: kept values + metadata, and the transposed copies the CUTLASS backend keeps
    parts = [getattr(t, a, None) for a in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")]
    if any(isinstance(p, torch.Tensor) for p in parts):
        return sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Parameters, buffers and the sparse weights of converted layers (plain attributes), once each."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for m in model.modules() if isinstance(m, SparseLinear) for t in (m.weight, m.bias) if t is not None]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total


def _peak_mib(model: nn.Module, x: torch.Tensor) -> float | None:
    """MiB one forward of ``model(x)`` allocates beyond what is resident (after timing: compiled already); None
    off CUDA."""
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize(x.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    model(x)
    torch.cuda.synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20


def _dense_and_sparse(model: nn.Module, device: str, dtype: torch.dtype, **accel) -> tuple[nn.Module, nn.Module, list]:
    """Two copies of ``model`` on ``device`` in ``dtype``: masks baked in, and :func:`accelerate_`d (its table
    third). Layers the sparse copy could not convert run their baked weights too: only the kernels differ."""
    dense = densify_(copy.deepcopy(model)).to(device=device, dtype=dtype).eval()
    sparse = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    table = accelerate_(sparse, dtype=dtype, **accel)
    return dense, densify_(sparse), table


def _kernel_name(backend: str, semi_kernel: str, plan: list[dict]) -> str | None:
    """The 2:4 kernel that ran (``cusparselt``/``cutlass``); None for BSR or when no layer was converted."""
    if backend != "semi_structured" or not any(r["converted"] for r in plan):
        return None
    return semi_structured_class(semi_kernel).BACKEND


def _compile(model: nn.Module, backend: str, mode: str | None) -> nn.Module:
    # one graph per batch size (dynamic=False): the shapes the kernels are tuned for, no symbolic-shape guards
    return torch.compile(model, backend=backend, mode=mode, dynamic=False)


@torch.no_grad()
def bench_infer(model_or_name: nn.Module | str | os.PathLike, backend: str = "semi_structured",
                batch_sizes: Sequence[int] = (64,), dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
                modes: Sequence[str] = ("eager",), img_size: int | None = None, device: str | None = None,
                warmup: int = 10, iters: int = 50, create_kwargs: dict | None = None, compile_backend: str = "inductor",
                compile_mode: str | None = None, blocksize: int | None = None, semi_kernel: str = "auto",
                progress: Callable[[dict], None] | None = None, channels_last: bool = False) -> dict[str, Any]:
    """Time ``model`` dense (masks baked in) and accelerated, for every dtype x batch size x mode.

    Args:
        model_or_name: a model (masked or plain), a timm name, a checkpoint or an export directory.
        backend: ``semi_structured`` or ``bsr`` (see :func:`accelerate_`); ``blocksize`` forces the BSR tile,
            ``semi_kernel`` the 2:4 kernel (``auto``, ``cusparselt``, ``cutlass``).
        batch_sizes, dtypes: the grid; sparse kernels need fp16/bf16 (fp32 only for BSR).
        modes: ``eager`` and/or ``compiled`` (``torch.compile(backend=compile_backend, mode=compile_mode)``,
            static shapes, compiled afresh for every batch size).
        img_size: input side; default the model's own.
        device: default ``cuda`` when available, else ``cpu``.
        warmup, iters: forwards before timing (compilation happens there), forwards timed (median reported).
        progress: called with each finished row.
        channels_last: both models and the input in channels-last memory (a conv net's fast layout; the 1x1 convs
            :func:`accelerate_` converts then read and write without copies).

    Returns:
        ``settings``, ``rows`` (one per dtype x batch x mode: ``dense_ms``, ``sparse_ms``, ``speedup`` =
        dense/sparse, ``dense_img_s``, ``sparse_img_s``, ``dense_peak_mib``/``sparse_peak_mib`` (weights plus what
        the forwards allocated; CUDA only), ``dense_weights_mib``/``sparse_weights_mib``, ``max_abs_diff`` of the
        sparse logits against the masked dense model run eagerly in the same dtype, ``converted``) and ``layers``
        (the :func:`accelerate_` table of every dtype, with a ``dtype`` column: what converts depends on it).
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes must be among {', '.join(MODES)}, got {bad}")
    model, name = resolve_model(model_or_name, create_kwargs)
    device = pick_device(device)
    img_size = img_size or default_img_size(model)
    gen = torch.Generator().manual_seed(0)
    inputs = {bs: torch.randn(bs, 3, img_size, img_size, generator=gen) for bs in batch_sizes}
    rows: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    for dtype in dtypes:
        dense, sparse, table = _dense_and_sparse(model, device, dtype, backend=backend, blocksize=blocksize,
                                                 semi_kernel=semi_kernel)
        if channels_last:
            to_channels_last(dense)
            to_channels_last(sparse)
        layers += [{"dtype": str(dtype).removeprefix("torch."), **r} for r in table]
        sizes = {"dense": weight_bytes(dense) / 2**20, "sparse": weight_bytes(sparse) / 2**20}
        runs = {"eager": (dense, sparse)}
        for bs in batch_sizes:
            if "compiled" in modes:
                # fresh graphs for every model x batch size: instances of one class share dynamo's recompile
                # limit, past which it would silently run eagerly and the "compiled" row would lie
                torch._dynamo.reset()
                runs["compiled"] = (_compile(dense, compile_backend, compile_mode),
                                    _compile(sparse, compile_backend, compile_mode))
            x = inputs[bs].to(device=device, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ref = dense(x).float()
            for mode in modes:
                d, s = runs[mode]
                dense_ms, sparse_ms = time_calls([lambda d=d, x=x: d(x), lambda s=s, x=x: s(x)], x.device, warmup,
                                                 iters)
                dense_extra, sparse_extra = _peak_mib(d, x), _peak_mib(s, x)
                row = {
                    "model": name, "backend": backend, "dtype": str(dtype).removeprefix("torch."), "batch_size": bs,
                    "mode": mode, "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4),
                    "speedup": round(dense_ms / sparse_ms, 4),
                    "dense_img_s": round(bs / dense_ms * 1e3, 1), "sparse_img_s": round(bs / sparse_ms * 1e3, 1),
                    "dense_peak_mib": None if dense_extra is None else round(sizes["dense"] + dense_extra, 1),
                    "sparse_peak_mib": None if sparse_extra is None else round(sizes["sparse"] + sparse_extra, 1),
                    "dense_weights_mib": round(sizes["dense"], 2), "sparse_weights_mib": round(sizes["sparse"], 2),
                    "max_abs_diff": float((s(x).float() - ref).abs().max()),
                    "converted": sum(r["converted"] for r in table),
                }
                rows.append(row)
                if progress:
                    progress(row)
        del dense, sparse, runs
    settings = {
        "model": name, "backend": backend, "img_size": img_size, "warmup": warmup, "iters": iters,
        "device": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu",
        "torch": torch.__version__, "compile_backend": compile_backend if "compiled" in modes else None,
        "compile_mode": compile_mode, "semi_kernel": _kernel_name(backend, semi_kernel, layers),
        "channels_last": channels_last,
    }
    return {"settings": settings, "rows": rows, "layers": layers}


@torch.no_grad()
def bench_layers(model_or_name: nn.Module | str | os.PathLike, backend: str = "semi_structured",
                 batch_size: int = 64, dtype: torch.dtype = torch.bfloat16, tags: Sequence[str] = ("ff",),
                 img_size: int | None = None, device: str | None = None, warmup: int = 10, iters: int = 50,
                 create_kwargs: dict | None = None, blocksize: int | None = None,
                 semi_kernel: str = "auto") -> dict[str, Any]:
    """The MLP linears alone (layers tagged ``ff``, or ``tags``): dense ``F.linear`` against the sparse kernel.

    Each layer gets the input size a whole-model forward of ``batch_size`` images feeds it (batch x tokens
    rows for a ViT). Layers of one shape and input size are timed once and counted (``count``); ``total`` sums
    count x time over every layer, which is the time those layers take in one forward.
    """
    model, name = resolve_model(model_or_name, create_kwargs)
    device = pick_device(device)
    img_size = img_size or default_img_size(model)
    dense, sparse, plan = _dense_and_sparse(model, device, dtype, backend=backend, blocksize=blocksize,
                                            semi_kernel=semi_kernel)
    chosen = [c.fqn for c in find_candidates(dense) if isinstance(c.module, nn.Linear) and c.tags & set(tags)]
    if not chosen:
        raise UserError(f"--layers times a transformer's {'/'.join(tags)} linears; {name} has none")
    in_shapes: dict[str, tuple[int, ...]] = {}

    def record(fqn: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:  # returns None: the output is kept
            in_shapes.setdefault(fqn, tuple(args[0].shape))
        return hook

    hooks = [dense.get_submodule(f).register_forward_hook(record(f)) for f in chosen]
    dense(torch.randn(batch_size, 3, img_size, img_size, device=device, dtype=dtype))
    for h in hooks:
        h.remove()
    table = {r["fqn"]: r for r in plan}
    groups: dict[tuple, list[str]] = {}
    for f in chosen:
        lin = dense.get_submodule(f)
        groups.setdefault((tuple(lin.weight.shape), in_shapes.get(f)), []).append(f)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for (shape, in_shape), fqns in groups.items():
        if in_shape is None:  # not reached by the forward
            continue
        lin, fast = dense.get_submodule(fqns[0]), sparse.get_submodule(fqns[0])
        x = torch.randn(*in_shape, generator=gen).to(device=device, dtype=dtype)
        dense_ms, sparse_ms = time_calls([lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias),
                                          lambda x=x, fast=fast: fast(x)], device, warmup, iters)
        rows.append({
            "layer": fqns[0], "count": len(fqns), "weight": "x".join(map(str, shape)),
            "rows": int(torch.tensor(in_shape[:-1]).prod()), "converted": table[fqns[0]]["converted"],
            "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4), "speedup": round(dense_ms / sparse_ms, 4),
            "max_abs_diff": float((fast(x).float() - F.linear(x, lin.weight, lin.bias).float()).abs().max()),
            "reason": table[fqns[0]]["reason"],  # why it runs sparse or not (accelerate_'s plan)
        })
    dense_total = sum(r["count"] * r["dense_ms"] for r in rows)
    sparse_total = sum(r["count"] * r["sparse_ms"] for r in rows)
    total = {"layer": "total", "count": sum(r["count"] for r in rows), "dense_ms": round(dense_total, 4),
             "sparse_ms": round(sparse_total, 4),
             "speedup": round(dense_total / sparse_total, 4) if sparse_total else None}
    settings = {"model": name, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
                "batch_size": batch_size, "img_size": img_size, "tags": list(tags), "warmup": warmup, "iters": iters,
                "device": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu",
                "torch": torch.__version__, "semi_kernel": _kernel_name(backend, semi_kernel, plan)}
    return {"settings": settings, "rows": rows, "total": total}
