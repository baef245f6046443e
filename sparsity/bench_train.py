"""Training-step cost of sparsity: dense vs each method on one model, A/B interleaved, with a step breakdown.

Library half of ``benchmark.py --bench train`` (no argparse, no printing). Every variant (``dense`` plus one per
recipe) is built from the same initial weights and kept resident; the timed steps then alternate between the
variants in short blocks, so machine drift (other processes, clocks, thermals) hits all of them alike. A step is
what ``engine.train_one_epoch`` does: ``controller.step(global_step)``, forward + loss, ``zero_grad``, backward,
``optimizer.step()``, each timed on its own (CUDA events on GPU, ``perf_counter`` on CPU). ``global_step`` moves
every step, so masks are recomputed as often as the recipe's ``mask_interval`` says (the built-in recipes: every
step). Nothing is extrapolated: the figures are medians of measured steps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .controller import SparsityController
from .engine import _autocast
from .factory import create_model
from .layers import to_channels_last
from .optim import attach_masks, create_optimizer
from .recipe import Recipe, recipe_from_dict
from .report import overall_sparsity
from .surgery import sparsify_

__all__ = ["BUILTIN_METHODS", "PHASES", "TrainBenchSettings", "builtin_recipe", "bench_train", "profile_train_step",
           "bench_masks"]

#: methods ``--methods`` accepts; each gets a built-in recipe (:func:`builtin_recipe`).
BUILTIN_METHODS = ("dense", "ste", "srste", "mdgf", "supermask", "gumbel")
#: the parts of a step timed separately (``mask`` is ``controller.step``).
PHASES = ("mask", "forward", "backward", "optimizer")


@dataclass
class TrainBenchSettings:
    """How the steps are run and timed."""

    batch_size: int = 64
    img_size: int | None = None  # input side; None: the model's own (32 for a ViT built with img_size=32)
    num_classes: int = 10
    steps: int = 30  # timed steps per variant
    warmup: int = 5  # untimed steps per variant first (allocator, caches, compilation)
    block: int = 1  # consecutive steps of one variant before switching to the next
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast
    channels_last: bool = False
    torchcompile: str | None = None  # a torch.compile backend ("inductor", "aot_eager", ...) or None
    opt: str = "adamw"
    opt_impl: str = "auto"  # as train.py's --opt-impl
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    total_steps: int = 100_000  # the controller's run length (phases/decays are fractions of it), 100 epochs
    at: float = 0.5  # where in that run the timed steps sit: mid-run, past a dense warm-up, before a fine-tune
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _is_transformer(model: nn.Module) -> bool:
    from .targets import find_candidates

    return any("ff" in c.tags or "qkv" in c.tags for c in find_candidates(model))


def builtin_recipe(method: str, model: nn.Module | None, n: int = 2, m: int = 4) -> Recipe:
    """The recipe ``--methods`` uses: N:M on ``ff`` + ``q``/``k``/``v`` of a transformer, or on every conv of a CNN.

    ``supermask`` learns tile masks instead of N:M: the same layers at sparsity ``1 - n/m`` in 8x8 tiles. The
    stem of a CNN (3 input channels) is skipped as not divisible by M, as every recipe does.
    """
    if method not in BUILTIN_METHODS:
        raise ValueError(f"unknown method {method!r} for the built-in recipes (valid: {', '.join(BUILTIN_METHODS)})")
    if method == "dense":
        return recipe_from_dict({"method": "dense"}, source="builtin:dense")
    targets = [["ff"], ["q", "k", "v"]] if _is_transformer(model) else [["conv"]]
    if method == "supermask":
        rules = [{"target": t, "sparsity": 1.0 - n / m, "tile": 8} for t in targets]
    else:
        rules = [{"target": t, "n": n, "m": m} for t in targets]
    return recipe_from_dict({"method": method, "rules": rules}, source=f"builtin:{method}")


class _Variant:
    """One model + controller + optimizer, stepped and timed."""

    def __init__(self, name: str, base: nn.Module, recipe: Recipe, s: TrainBenchSettings,
                 x: torch.Tensor, y: torch.Tensor) -> None:
        self.name, self.recipe, self.s, self.x, self.y = name, recipe, s, x, y
        model = sparsify_(copy.deepcopy(base), recipe)
        model.to(s.device)
        if s.channels_last:
            to_channels_last(model)
        model.train()
        self.model = model
        self.ctl = SparsityController(model, recipe, total_steps=s.total_steps,
                                      steps_per_epoch=max(1, s.total_steps // 100))
        if recipe.method != "dense" and not self.ctl.layers:
            logging.getLogger(__name__).warning("%s: the recipe masks no layer of this model (its rules skip every "
                                                "layer they select, or leave them dense); its row times the dense "
                                                "model", name)
        self.global_step = int(round(s.at * s.total_steps))
        self.ctl.step(self.global_step)
        self.optimizer, self.opt_impl = create_optimizer(self.ctl.param_groups(s.weight_decay), impl=s.opt_impl,
                                                         opt=s.opt, lr=s.lr, weight_decay=s.weight_decay)
        # as train.py without --clip-grad: masks (and SR-STE's decay) in the optimizer's pass
        self.optimizer_masks = attach_masks(self.optimizer, self.ctl, srste_decay=True) is None
        self.train_model = torch.compile(model, backend=s.torchcompile) if s.torchcompile else model
        self.loss_fn = nn.CrossEntropyLoss()
        self.times: dict[str, list[float]] = {p: [] for p in ("step",) + PHASES}
        self.peak_bytes: int | None = None

    def step(self, record: bool) -> None:
        cuda = torch.device(self.s.device).type == "cuda"
        if cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            mark = lambda i: marks[i].record()  # noqa: E731 - events queue on the stream, no host sync
        else:
            marks = [0.0] * 5

            def mark(i: int) -> None:
                marks[i] = time.perf_counter()
        mark(0)
        self.ctl.step(self.global_step)
        mark(1)
        with _autocast(torch.device(self.s.device), torch.bfloat16 if self.s.amp else None):
            loss = self.loss_fn(self.train_model(self.x), self.y)
        mark(2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark(3)
        self.optimizer.step()
        mark(4)
        self.global_step += 1
        if not record:
            return
        if cuda:
            torch.cuda.synchronize()
            ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(4)]
        else:
            ms = [(marks[i + 1] - marks[i]) * 1e3 for i in range(4)]
        for phase, v in zip(PHASES, ms):
            self.times[phase].append(v)
        self.times["step"].append(sum(ms))

    def state_bytes(self) -> dict[str, int]:
        """Resident bytes: parameters, buffers, gradients, optimizer state, and the sparse path's caches."""
        m = self.model
        params = sum(p.numel() * p.element_size() for p in m.parameters())
        buffers = sum(b.numel() * b.element_size() for b in m.buffers())
        grads = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
        opt = sum(t.numel() * t.element_size() for st in self.optimizer.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor))
        caches = 0
        for _, layer in self.ctl.layers:
            for attr in ("_mask_factor", "_masked_cache"):  # float mask factor, precomputed W * E
                cached = getattr(layer, attr, None)
                if cached is not None:
                    caches += cached[1].numel() * cached[1].element_size()
        ws = getattr(self.ctl.method, "_workspace", None) or {}
        caches += sum(t.numel() * t.element_size() for t in ws.values() if isinstance(t, torch.Tensor))
        return {"params": params, "buffers": buffers, "grads": grads, "optimizer": opt, "sparse_caches": caches}


def _with_img_size(s: TrainBenchSettings, model: nn.Module) -> TrainBenchSettings:
    """``s`` with ``img_size`` filled in from ``model`` (the size a fixed-size ViT was built for) when None."""
    if s.img_size is not None:
        return s
    from .bench_infer import default_img_size

    return dataclasses.replace(s, img_size=default_img_size(model))


def _median(v: list[float]) -> float | None:
    return statistics.median(v) if v else None


def bench_train(model_name: str, recipes: dict[str, Recipe], settings: TrainBenchSettings | None = None,
                on_progress=None) -> dict[str, Any]:
    """Time full training steps of ``model_name`` dense and under each recipe, A/B interleaved.

    Args:
        model_name: a timm model name (built with ``settings.model_kwargs`` and ``settings.num_classes``).
        recipes: variant name -> recipe. A ``dense`` baseline is added when missing; it is the reference of every
            ratio.
        settings: batch, input size, steps, device, AMP, channels-last, compile, optimizer, and where in a
            ``total_steps`` run the timed steps sit (``at``: recipes with phases, ladders or ramps are timed in the
            state they have there; each row's ``phase`` and ``pattern`` say which).
        on_progress: optional callable ``(round, rounds)`` (the CLI's progress line).

    Returns:
        ``settings`` (as given, plus device name and threads), and ``rows``: per variant the median ``step_ms``
        and per-phase ``<phase>_ms``, ``ratio`` (median step / dense median step), ``ratio_paired`` (median over
        rounds of the variant's step time over dense's step time in the same round), ``ratio_mean`` (means: the
        figure to read when a cost recurs every few steps, e.g. ``mask_interval > 1``), ``peak_step_mb`` (CUDA:
        peak allocated during a step above what was allocated before it; None on CPU) and ``state_mb``.
    """
    s = settings or TrainBenchSettings()
    recipes = dict(recipes)
    if "dense" not in recipes:
        recipes = {"dense": recipe_from_dict({"method": "dense"}, source="builtin:dense"), **recipes}
    torch.manual_seed(s.seed)
    base = create_model(model_name, num_classes=s.num_classes, **s.model_kwargs)
    s = _with_img_size(s, base)
    device = torch.device(s.device)
    gen = torch.Generator().manual_seed(s.seed)
    x = torch.randn(s.batch_size, 3, s.img_size, s.img_size, generator=gen).to(device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), generator=gen).to(device)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    variants = [_Variant(name, base, r, s, x, y) for name, r in recipes.items()]
    del base
    for v in variants:  # warm-up, and on CUDA the step's peak memory above the resident state
        for i in range(s.warmup):
            if device.type == "cuda" and i == s.warmup - 1:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                v.step(record=False)
                torch.cuda.synchronize()
                v.peak_bytes = torch.cuda.max_memory_allocated(device) - before
            else:
                v.step(record=False)
    rounds = max(1, -(-s.steps // s.block))
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate the order: no variant always goes first
        this_round: dict[str, float] = {}
        for v in order:
            start = len(v.times["step"])
            for _ in range(s.block):
                v.step(record=True)
            this_round[v.name] = statistics.median(v.times["step"][start:])
        per_round.append(this_round)
        if on_progress is not None:
            on_progress(r + 1, rounds)
    dense_times = next(v for v in variants if v.name == "dense").times["step"]
    dense_ms, dense_mean = _median(dense_times), statistics.fmean(dense_times)
    rows = []
    for v in variants:
        step_ms = _median(v.times["step"])
        paired = [rd[v.name] / rd["dense"] for rd in per_round]
        state = v.state_bytes()
        row: dict[str, Any] = {
            "variant": v.name, "method": v.recipe.method, "masked_layers": len(v.ctl.layers),
            "step_ms": round(step_ms, 3), "ratio": round(step_ms / dense_ms, 4),
            "ratio_paired": round(statistics.median(paired), 4),
            "step_ms_mean": round(statistics.fmean(v.times["step"]), 3),
            "ratio_mean": round(statistics.fmean(v.times["step"]) / dense_mean, 4),
            "step_ms_p10": round(_quantile(v.times["step"], 0.1), 3),
            "step_ms_p90": round(_quantile(v.times["step"], 0.9), 3),
        }
        for phase in PHASES:
            row[f"{phase}_ms"] = round(_median(v.times[phase]), 3)
        for phase in PHASES:
            row[f"{phase}_ms_mean"] = round(statistics.fmean(v.times[phase]), 3)
        row["peak_step_mb"] = None if v.peak_bytes is None else round(v.peak_bytes / 2**20, 2)
        row["state_mb"] = round(sum(state.values()) / 2**20, 2)
        row["sparse_caches_mb"] = round(state["sparse_caches"] / 2**20, 2)
        row["steps"] = len(v.times["step"])
        # steps whose next masks came out of the optimizer's pass (warm-up included), of all steps
        row["masks_in_optimizer"] = f"{v.optimizer.native_steps}/{v.optimizer.steps}" if v.optimizer_masks else ""
        if v.optimizer_masks:  # its last optimizer step prepared the step after the timed ones: back to the last
            v.ctl.step(v.global_step - 1)
        timed = v.ctl.metrics()  # what the timed steps ran: an SDGF frame, a GMP ramp, a phase
        row["timed_step"] = v.global_step - 1
        row["phase"] = timed.get("phase", "")
        if not timed.get("pattern") and v.recipe.method in ("supermask", "gumbel") and timed.get("phase") != "dense":
            # learned masks report no N:M; in their sparse phases they run their rules' patterns throughout
            from .compare import describe_pattern

            timed["pattern"] = describe_pattern(v.recipe)
        row["pattern"] = timed.get("pattern", "")
        with torch.no_grad():  # zeros in the selected layers' forward weights where the timed steps ran
            row["forward_sparsity"] = round(overall_sparsity(v.model), 4) if v.ctl.layers else 0.0
        rows.append(row)
    out_settings = {k: getattr(s, k) for k in s.__dataclass_fields__}
    out_settings.update({
        "model": model_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "rounds": rounds, "recipes": {name: r.source for name, r in recipes.items()},
        "optimizer": f"{type(variants[0].optimizer).__name__} ({variants[0].opt_impl})",
        "process_max_rss_mb": _max_rss_mb(),  # CPU: the whole process, all variants resident together
    })
    return {"settings": out_settings, "rows": rows}


def _max_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _quantile(v: list[float], q: float) -> float:
    xs = sorted(v)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def profile_train_step(model_name: str, recipe: Recipe, settings: TrainBenchSettings | None = None,
                       steps: int = 5, row_limit: int = 25) -> str:
    """``torch.profiler`` table (self time, top ops) of ``steps`` training steps of one variant after warm-up."""
    from torch.profiler import ProfilerActivity, profile, record_function

    s = settings or TrainBenchSettings()
    torch.manual_seed(s.seed)
    base = create_model(model_name, num_classes=s.num_classes, **s.model_kwargs)
    s = _with_img_size(s, base)
    device = torch.device(s.device)
    x = torch.randn(s.batch_size, 3, s.img_size, s.img_size, device=device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=device)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = _Variant(recipe.method, base, recipe, s, x, y)
    for _ in range(s.warmup):
        v.step(record=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("train_step"):
                v.step(record=False)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)


def _topk_nm_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """The previous ``nm_mask``: topk (argmax for n = 1) + scatter on a moved copy; its tie order is unspecified."""
    from .masks import _group_view

    g = _group_view(w.detach().abs(), m, dim)
    idx = g.argmax(dim=-1, keepdim=True) if n == 1 else g.topk(n, dim=-1, sorted=False).indices
    keep = torch.zeros(g.shape, dtype=torch.bool, device=w.device).scatter_(-1, idx, True)
    return keep.reshape(w.movedim(dim, -1).shape).movedim(-1, dim)


def _sorted_nm_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Reference with the documented tie rule: stable descending sort, the lower index first among ties."""
    from .masks import _group_view

    g = _group_view(w.detach().abs(), m, dim)
    idx = g.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(g.shape, dtype=torch.bool, device=w.device).scatter_(-1, idx, True)
    return keep.reshape(w.movedim(dim, -1).shape).movedim(-1, dim)


def bench_masks(model_name: str, model_kwargs: dict | None = None, patterns=((2, 4), (1, 4), (1, 8), (2, 8), (4, 8),
                (1, 16), (2, 16)), iters: int = 10, device: str = "cpu", channels_last: bool = False) -> dict[str, Any]:
    """Time N:M masks of every Linear/Conv2d weight of a model: per-layer topk + scatter (the previous
    implementation) against :func:`sparsity.masks.nm_masks_` (the native kernel where it runs, else the batched
    torch rank kernel; ``settings.native_kernel`` and ``settings.rank_kernel`` say which), interleaved, medians.
    On CUDA, or with ``SPARSITY_COMPILED_MASKS=1``, the other setting of that switch is timed too
    (``compiled_rank_ms`` or ``eager_rank_ms``).

    Weights are grouped along the input dimension (channels for convs); a layer whose width is not divisible by
    M is left out. ``equal`` checks the kernel against a stable-sort reference (ties to the lower index); topk's
    own tie order is unspecified (on CPU it keeps the higher index), so it is timed, not compared.
    """
    from .bench_infer import time_calls
    from .masks import grouped_dim
    from .nm_batch import nm_masks_, rank_kernel_status

    torch.manual_seed(0)
    model = create_model(model_name, **(model_kwargs or {})).to(device)  # timm's errors as one line
    if channels_last:
        to_channels_last(model)
    rows = []
    status = rank_kernel_status()
    for n, m in patterns:
        ws = [mod.weight.detach() for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))
              and mod.weight.shape[grouped_dim(mod.weight)] % m == 0]
        dims = [grouped_dim(w) for w in ws]
        masks = [torch.empty_like(w, dtype=torch.bool) for w in ws]
        workspace: dict = {}
        batch = nm_masks_(masks, ws, n, m, dims, workspace=workspace)  # the native call, replayed as a run does
        equal = _masks_equal(masks, ws, n, m, dims)
        # On a GPU (or when opted in) the other setting of SPARSITY_COMPILED_MASKS is timed too: the A/B of that
        # switch. Not when one native call took every tensor (float32 on CPU): the switch changes nothing there.
        other = None
        if batch is None and (status == "compiled" or (status == "eager" and torch.device(device).type == "cuda")):
            other = ("eager_rank_ms", False) if status == "compiled" else ("compiled_rank_ms", True)
            nm_masks_(masks, ws, n, m, dims, workspace=workspace, compiled=other[1])  # compiled before timing
            equal = equal and _masks_equal(masks, ws, n, m, dims)
            if rank_kernel_status() != status:  # compiling failed (the warning says why): nothing to compare
                other = None

        def topk(ws=ws, dims=dims, n=n, m=m) -> None:
            for w, d in zip(ws, dims):
                _topk_nm_mask(w, n, m, d)

        def rank(ws=ws, dims=dims, masks=masks, workspace=workspace, batch=batch, n=n, m=m, compiled=None) -> None:
            if batch is None or not batch.run():
                nm_masks_(masks, ws, n, m, dims, workspace=workspace, compiled=compiled)

        def other_rank(compiled=other[1] if other else None) -> None:
            rank(compiled=compiled)

        med = dict(zip(["topk_ms", "rank_ms", *([other[0]] if other else [])],
                       time_calls([topk, rank, *([other_rank] if other else [])], device, warmup=0, iters=iters)))
        rows.append({"pattern": f"{n}:{m}", "layers": len(ws), "weights": sum(w.numel() for w in ws),
                     **{k: round(v, 3) for k, v in med.items()},
                     "speedup": round(med["topk_ms"] / med["rank_ms"], 2), "equal": equal})
    from . import native

    return {"settings": {"model": model_name, "model_kwargs": model_kwargs or {}, "device": device, "iters": iters,
                         "channels_last": channels_last, "threads": torch.get_num_threads(),
                         "native_kernel": native.status(), "rank_kernel": rank_kernel_status()}, "rows": rows}


def _masks_equal(masks, ws, n: int, m: int, dims) -> bool:
    return all(torch.equal(mk, _sorted_nm_mask(w, n, m, d)) for mk, w, d in zip(masks, ws, dims))
