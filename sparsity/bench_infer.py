"""Inference throughput: the same model dense (masks baked in) vs after :func:`accelerate_`, measured.

Library half of ``benchmark.py --bench infer``: no argparse, no printing. Nothing is computed from a theoretical
model; on CPU or a GPU below sm80 the "sparse" model is the dense one and the figures say so.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
from torch import nn

from .accelerate import accelerate_
from .surgery import densify_

__all__ = ["bench_infer", "time_forward"]


@torch.no_grad()
def time_forward(model: nn.Module, x: torch.Tensor, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds per forward of ``model(x)`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        model(x)
    times = []
    cuda = x.device.type == "cuda"
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _resolve(model_or_name: nn.Module | str | os.PathLike, create_kwargs: dict | None) -> tuple[nn.Module, str]:
    if isinstance(model_or_name, nn.Module):
        return model_or_name, type(model_or_name).__name__
    import timm

    name = str(model_or_name)
    if timm.is_model(name):
        return timm.create_model(name, **(create_kwargs or {})), name
    from .export import load_for_eval

    model, meta = load_for_eval(name)
    return model, meta["arch"]


def bench_infer(model_or_name: nn.Module | str | os.PathLike, backend: str = "semi_structured",
                batch_size: int = 64, img_size: int | None = None, dtype: torch.dtype = torch.bfloat16,
                device: str | None = None, warmup: int = 10, iters: int = 50,
                create_kwargs: dict | None = None) -> dict[str, Any]:
    """Time ``model`` dense and accelerated on random input.

    Args:
        model_or_name: a model (masked or plain), a timm name, a checkpoint or an export directory.
        backend: ``semi_structured`` or ``bsr`` (see :func:`accelerate_`).
        batch_size: images per forward.
        img_size: input side; default from the model's ``pretrained_cfg['input_size']``.
        dtype: dtype both runs use (sparse kernels need fp16/bf16).
        device: default ``cuda`` when available, else ``cpu``.
        warmup, iters: forwards before timing, forwards timed (median reported).
        create_kwargs: for a timm name.

    Returns:
        ``dense_ms``, ``sparse_ms``, ``speedup`` (dense / sparse), ``converted`` (layers run sparse), the
        ``layers`` table of :func:`accelerate_`, and the settings (device name, dtype, batch, input size).
    """
    model, name = _resolve(model_or_name, create_kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if img_size is None:  # a ViT built with img_size=... only takes that size; pretrained_cfg keeps the default
        fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
        img_size = int(fixed[-1]) if fixed else \
            int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    sparse = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    dense = densify_(copy.deepcopy(model)).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device, dtype=dtype)
    rows = accelerate_(sparse, backend=backend, dtype=dtype)
    densify_(sparse)  # layers left dense run baked weights, as in the dense model: only the kernels differ
    dense_ms = time_forward(dense, x, warmup, iters)
    sparse_ms = time_forward(sparse, x, warmup, iters)
    return {
        "model": name, "backend": backend, "device": torch.cuda.get_device_name(device) if device.startswith("cuda")
        else "cpu", "dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size, "img_size": img_size,
        "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4), "speedup": round(dense_ms / sparse_ms, 4),
        "converted": sum(r["converted"] for r in rows), "layers": rows,
    }
