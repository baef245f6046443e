"""Channel permutation for N:M: reorder a layer's input channels so that N:M pruning keeps more magnitude.

N:M groups run along input channels (DESIGN.md section 3). Which channels share a group is arbitrary as long as
the layer that *produces* those channels is permuted the same way: permute the consumer's input channels by
``perm`` and the producer's output channels (weight rows, bias) and every per-channel tensor in between (norm
affine and running stats) by the same ``perm``, and the network computes the same function.

Only pairs where that is provably exact are touched (:func:`find_pairs`):

* timm ``Mlp`` / ``GlobalResponseNormMlp`` (ViT, DeiT, Swin, ConvNeXt v1/v2): ``fc1 -> act -> drop -> norm ->
  fc2`` with an elementwise activation and ``norm`` one of Identity, LayerNorm (statistics over all channels,
  per-channel affine) or GlobalResponseNorm (channel mean of per-channel norms, per-channel affine).
* timm ResNet ``BasicBlock`` (``conv1 -> bn1 -> drop_block -> act1 -> aa -> conv2``) and ``Bottleneck``
  (``conv1 -> bn1 -> act1 -> conv2`` and ``conv2 -> bn2 -> drop_block -> act2 -> aa -> conv3``), when the convs
  are ungrouped. DropBlock shares one spatial mask across channels by default (and is the identity in eval);
  BlurPool applies the same filter to every channel (its per-channel buffer is permuted anyway).

Anything else between the two layers (an unknown module, a per-channel PReLU, a grouped conv, a gated MLP) makes
the pair ineligible, with the reason in the report.

The search (:func:`search_permutation`) is a greedy channel-swap hill climb: repeatedly apply the swap of two
channels from different groups that increases the kept magnitude the most, inside windows of channels whose
boundaries shift from round to round, until no swap helps or the per-layer time limit is spent. Kept magnitude
never decreases (only improving swaps are applied, and the result is checked against the identity).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import MaskedMixin

__all__ = ["PermutePair", "find_pairs", "kept_magnitude", "search_permutation", "apply_permutation_", "permute_model_"]

_logger = logging.getLogger(__name__)


# ---- pure math ----------------------------------------------------------------------------------------------------
def _rows(w: torch.Tensor) -> torch.Tensor:
    """(R, C) view of |w| with input channels last: Linear (out, in) as is, Conv (O, I, kh, kw) as (O*kh*kw, I)."""
    a = w.detach().abs()
    if a.dim() == 4:
        a = a.permute(0, 2, 3, 1)
    return a.reshape(-1, a.shape[-1])


def _kept_rows(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Kept magnitude per group: x (R, C) -> (G,) sums of the top-n of every m consecutive columns, over rows."""
    r, c = x.shape
    g = x.reshape(r, c // m, m)
    return g.topk(n, dim=-1).values.sum(dim=(0, 2))


def kept_magnitude(w: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Sum of |w| kept by N:M pruning along the input channels (after permuting them by ``perm``)."""
    x = _rows(w).double()
    if perm is not None:
        x = x[:, perm]
    return float(_kept_rows(x, n, m).sum())


class _Window:
    """Greedy best-swap hill climb over the columns of one window x (R, C), groups of m consecutive columns.

    Replacing the channel at position ``a`` (group g) by channel ``b`` keeps ``A[a] + sum_r relu(x_rb - T[a, r])``
    in group g, where ``A[a]`` is the top-n sum of the group without position ``a`` and ``T[a]`` its n-th largest
    value per row. So the gain of swapping positions a and b is ``D[a, b] + D[b, a]`` with
    ``D[a, b] = A[a] + H[a, b] - K[g(a)]``, ``H[a, b] = sum_r relu(x_rb - T[a, r])`` and ``K`` the kept sums.
    After a swap only the rows of the two touched groups and the two swapped columns of ``D`` change.
    """

    def __init__(self, x: torch.Tensor, n: int, m: int, chunk_elems: int = 1 << 24) -> None:
        self.x, self.n, self.m = x, n, m
        self.r, self.c = x.shape
        self.grp = torch.arange(self.c, device=x.device) // m
        self.chunk = max(1, chunk_elems // max(self.r * self.c, 1))
        others = torch.tensor([[j for j in range(m) if j != p] for p in range(m)], device=x.device)  # (m, m-1)
        self.others = others
        self.A = torch.empty(self.c, dtype=x.dtype, device=x.device)
        self.T = torch.empty(self.c, self.r, dtype=x.dtype, device=x.device)
        self.K = torch.empty(self.c // m, dtype=x.dtype, device=x.device)
        self.D = torch.empty(self.c, self.c, dtype=x.dtype, device=x.device)
        self._stats(torch.arange(self.c // m, device=x.device))
        self._rows_of_d(torch.arange(self.c, device=x.device))
        self.same = self.grp[:, None] == self.grp[None, :]

    def _stats(self, groups: torch.Tensor) -> None:
        """A, T for every position of ``groups`` and K of those groups."""
        n, m = self.n, self.m
        g = self.x.reshape(self.r, self.c // m, m)[:, groups]  # (R, g, m)
        srt = g[:, :, self.others].sort(dim=-1, descending=True).values  # (R, g, m, m-1)
        pos = (groups[:, None] * m + torch.arange(m, device=g.device)).reshape(-1)
        self.A[pos] = srt[..., :n].sum(dim=(0, 3)).reshape(-1)
        self.T[pos] = srt[..., n - 1].permute(1, 2, 0).reshape(-1, self.r)
        self.K[groups] = g.topk(n, dim=-1).values.sum(dim=(0, 2))

    def _h(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(rows), len(cols), dtype=self.x.dtype, device=self.x.device)
        xc = self.x[:, cols]  # (R, k)
        step = max(1, self.chunk * self.c // max(len(cols), 1))
        for i in range(0, len(rows), step):
            t = self.T[rows[i:i + step]]  # (a, R)
            out[i:i + step] = (xc[None, :, :] - t[:, :, None]).clamp_min_(0).sum(dim=1)
        return out

    def _rows_of_d(self, rows: torch.Tensor) -> None:
        allc = torch.arange(self.c, device=self.x.device)
        self.D[rows] = self.A[rows, None] + self._h(rows, allc) - self.K[self.grp[rows], None]

    def _cols_of_d(self, cols: torch.Tensor) -> None:
        allr = torch.arange(self.c, device=self.x.device)
        self.D[:, cols] = self.A[:, None] + self._h(allr, cols) - self.K[self.grp][:, None]

    def run(self, deadline: float, eps: float) -> tuple[torch.Tensor, int]:
        """Permutation of the window's columns (new position k holds old column perm[k]) and the swap count."""
        perm = torch.arange(self.c, device=self.x.device)
        swaps = 0
        while True:  # at least one swap is tried, then until no swap helps or the deadline passes
            gain = self.D + self.D.T
            gain.masked_fill_(self.same, float("-inf"))
            best = int(gain.argmax())
            a, b = divmod(best, self.c)
            if not float(gain[a, b]) > eps:
                break
            self.x[:, [a, b]] = self.x[:, [b, a]]
            perm[[a, b]] = perm[[b, a]]
            swaps += 1
            groups = torch.unique(self.grp[[a, b]])
            self._stats(groups)
            touched = (groups[:, None] * self.m + torch.arange(self.m, device=self.x.device)).reshape(-1)
            self._rows_of_d(touched)
            self._cols_of_d(torch.tensor([a, b], device=self.x.device))
            if time.monotonic() >= deadline:
                break
        return perm, swaps


def search_permutation(
    w: torch.Tensor, n: int, m: int, time_limit: float = 10.0, window: int = 256,
) -> tuple[torch.Tensor, dict]:
    """Search an input-channel permutation of ``w`` that maximizes the magnitude N:M pruning keeps.

    Args:
        w: Linear weight (out, in) or Conv2d weight (O, I, kh, kw); groups of ``m`` run along the input channels.
        n: entries kept per group.
        m: group size; the input channel count must be divisible by it.
        time_limit: seconds for this layer (the first window always gets at least one swap attempt).
        window: channels searched together (rounded to a multiple of ``m``); window boundaries shift every round.

    Returns:
        ``(perm, info)``: ``perm`` (LongTensor, new channel k is old channel ``perm[k]``) and ``info`` with
        ``kept_before``, ``kept_after``, ``total`` (sum of |w|), ``swaps``, ``rounds``, ``seconds`` and
        ``hit_limit``: the search ran into ``time_limit`` (its result then depends on the machine's speed and load)
        instead of stopping where no swap helps any more.
    """
    t0 = time.monotonic()
    x = _rows(w)
    c = x.shape[1]
    if c % m:
        raise ValueError(f"input channels {c} not divisible by m={m}")
    if not 1 <= n <= m:
        raise ValueError(f"N:M pattern must keep 1..m of every m, got {n}:{m}")
    x = x.float()
    identity = torch.arange(c, device=x.device)
    before = float(_kept_rows(x.double(), n, m).sum())
    info = {"kept_before": before, "kept_after": before, "total": float(x.double().sum()), "swaps": 0, "rounds": 0,
            "seconds": 0.0, "hit_limit": False}
    if n == m or c == m:
        return identity, info
    window = max(2 * m, (min(window, c) // m) * m)
    deadline = t0 + time_limit
    eps = 1e-5 * before / (c // m)  # float32 noise floor of a gain, relative to one group's kept magnitude
    perm = identity.clone()
    idle_rounds, rnd = 0, 0
    while True:
        offset = (window // (2 * m)) * m if rnd % 2 else 0
        bounds = sorted({0, c, *range(offset or window, c, window)})
        improved = False
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi - lo < 2 * m:
                continue
            if time.monotonic() >= deadline and (rnd or lo):
                break
            sub_perm, swaps = _Window(x[:, perm[lo:hi]].clone(), n, m).run(deadline, eps)
            if swaps:
                perm[lo:hi] = perm[lo:hi][sub_perm]
                info["swaps"] += swaps
                improved = True
        rnd += 1
        idle_rounds = 0 if improved else idle_rounds + 1
        # one window covering every channel is searched to convergence in one round; otherwise stop once both
        # window offsets found nothing to improve
        if window >= c or idle_rounds >= 2 or time.monotonic() >= deadline:
            break
    after = float(_kept_rows(x[:, perm].double(), n, m).sum())
    if after < before:  # rounding in the incremental gains: never hand back something worse than the identity
        perm, after = identity, before
    info.update(kept_after=after, rounds=rnd, seconds=time.monotonic() - t0, hit_limit=time.monotonic() >= deadline)
    return perm, info


# ---- model side: which pairs are exact, and applying a permutation ---------------------------------------------------
def _elementwise_types() -> tuple[type, ...]:
    types: list[type] = [
        nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
        nn.Tanh, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.Mish, nn.Softplus,
    ]
    try:
        from timm.layers import activations as acts

        types += [getattr(acts, k) for k in ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid",
                                             "HardMish", "GELU", "GELUTanh", "QuickGELU") if hasattr(acts, k)]
        from timm.layers import activations_me as me

        types += [getattr(me, k) for k in ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe")
                  if hasattr(me, k)]
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(types)


def _channel_modules() -> tuple[type, ...]:
    """Modules whose per-channel tensors are permuted with the channels (statistics are channel-symmetric)."""
    out: list[type] = [nn.BatchNorm2d, nn.LayerNorm, nn.AvgPool2d, nn.MaxPool2d]
    for mod_name, cls_name in (("grn", "GlobalResponseNorm"), ("drop", "DropBlock2d"), ("blur_pool", "BlurPool2d")):
        try:
            module = importlib.import_module(f"timm.layers.{mod_name}")
        except ImportError:  # pragma: no cover - timm is a dependency
            continue
        if hasattr(module, cls_name):
            out.append(getattr(module, cls_name))
    return tuple(out)


def _between_problem(mod: nn.Module, channels: int) -> str | None:
    if isinstance(mod, nn.PReLU):
        return "PReLU" if mod.num_parameters != 1 else None
    if isinstance(mod, _elementwise_types()):
        return None
    if isinstance(mod, nn.LayerNorm):
        shape = tuple(mod.normalized_shape)
        return None if shape == (channels,) else f"LayerNorm over {shape} is not over the channels alone"
    if isinstance(mod, nn.BatchNorm2d):
        return None if mod.num_features == channels else "BatchNorm width mismatch"
    if isinstance(mod, _channel_modules()):
        return None
    return f"{type(mod).__name__} is not known to commute with a channel permutation"


@dataclass
class PermutePair:
    """A producer -> consumer pair: permuting the consumer's input channels and the producer's output channels
    (and the per-channel tensors of ``between``) leaves the network's function unchanged when ``problem`` is None."""

    producer: str
    consumer: str
    between: list[tuple[str, nn.Module]] = field(default_factory=list)
    problem: str | None = None


def _conv_ok(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        return f"grouped conv (groups={mod.groups})"
    if type(mod) not in (nn.Linear, nn.Conv2d) and not isinstance(mod, MaskedMixin):
        return f"{type(mod).__name__} is not a plain Linear/Conv2d"
    return None


def find_pairs(model: nn.Module) -> list[PermutePair]:
    """Every producer -> consumer pair of ``model`` this module knows about, with ``problem`` set if not exact."""
    try:
        from timm.layers import GlobalResponseNormMlp, Mlp
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover
        return []
    pairs: list[PermutePair] = []
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        chains: list[tuple[str, str, list[str]]] = []
        if type(mod) is Mlp:
            chains.append(("fc1", "fc2", ["act", "drop1", "norm"]))
        elif type(mod) is GlobalResponseNormMlp:
            chains.append(("fc1", "fc2", ["act", "drop1", "grn"]))
        elif type(mod) is BasicBlock:
            chains.append(("conv1", "conv2", ["bn1", "drop_block", "act1", "aa"]))
        elif type(mod) is Bottleneck:
            chains.append(("conv1", "conv2", ["bn1", "act1"]))
            chains.append(("conv2", "conv3", ["bn2", "drop_block", "act2", "aa"]))
        for prod, cons, mids in chains:
            p_mod, c_mod = getattr(mod, prod), getattr(mod, cons)
            channels = p_mod.weight.shape[0]
            between = [(pre + k, getattr(mod, k)) for k in mids if getattr(mod, k, None) is not None]
            problem = _conv_ok(p_mod) or _conv_ok(c_mod)
            if problem is None and c_mod.weight.shape[1] != channels:
                problem = "channel count mismatch"
            for _, b in between:
                problem = problem or _between_problem(b, channels)
            if problem is None:
                problem = _masked_problem(p_mod, producer=True) or _masked_problem(c_mod, producer=False)
            pairs.append(PermutePair(pre + prod, pre + cons, between, problem))
    return pairs


def _masked_problem(mod: nn.Module, producer: bool) -> str | None:
    if not isinstance(mod, MaskedMixin) or not mod.slices:
        return None
    rows = mod.weight.shape[0]
    if producer:
        if len(mod.slices) != 1 or (mod.slices[0].start, mod.slices[0].stop) != (0, rows):
            return "producer has per-slice patterns on its output rows"
        if mod.slices[0].sparse_dim == "col":
            return "producer groups along its output dim (sparse_dim: col)"
    elif any(s.sparse_dim == "col" for s in mod.slices):
        return "consumer groups along its output dim (sparse_dim: col): input order does not matter"
    return None


@torch.no_grad()
def _permute_dim0_(t: torch.Tensor | None, perm: torch.Tensor) -> None:
    if t is not None:
        t.copy_(t[perm])


@torch.no_grad()
def apply_permutation_(model: nn.Module, pair: PermutePair, perm: torch.Tensor) -> None:
    """Permute the consumer's input channels and the producer's output channels (and everything between)."""
    if pair.problem:
        raise ValueError(f"{pair.producer} -> {pair.consumer} cannot be permuted exactly: {pair.problem}")
    prod = model.get_submodule(pair.producer)
    cons = model.get_submodule(pair.consumer)
    perm = perm.to(prod.weight.device)
    channels = prod.weight.shape[0]
    _permute_dim0_(prod.weight, perm)
    _permute_dim0_(prod.bias, perm)
    if isinstance(prod, MaskedMixin):
        _permute_dim0_(prod.weight_mask, perm)
    for _, mod in pair.between:
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.dim() >= 1 and t.shape[0] == channels:
                _permute_dim0_(t, perm)
    cons.weight.copy_(cons.weight[:, perm])
    if isinstance(cons, MaskedMixin):
        cons.weight_mask.copy_(cons.weight_mask[:, perm])


def _consumer_nm(mod: nn.Module, n: int | None, m: int | None) -> tuple[int, int] | None:
    if isinstance(mod, MaskedMixin) and mod.slices:
        pats = {(s.n, s.m) for s in mod.slices}
        if len(pats) == 1 and None not in next(iter(pats)):
            return next(iter(pats))  # type: ignore[return-value]
        return None
    return (n, m) if n is not None and m is not None else None


def permute_model_(
    model: nn.Module, n: int | None = None, m: int | None = None, time_limit: float = 10.0,
    only: set[str] | None = None, window: int = 256,
) -> list[dict]:
    """Permute every exact pair of ``model`` in place so that N:M pruning of the consumers keeps more magnitude.

    A masked consumer uses its own N:M (all its slices must share one pattern); an unmasked consumer uses ``n``/``m``
    when given, else it is left alone. ``only`` restricts the search to these consumer fqns; ``time_limit`` (seconds)
    and ``window`` (channels searched together) are per layer, see :func:`search_permutation`.

    Returns one row per pair: ``producer``, ``consumer``, ``pattern``, ``kept_before``, ``kept_after``, ``total``,
    ``recovered`` (share of the magnitude lost to N:M that the permutation won back), ``swaps``, ``seconds``,
    ``hit_limit`` (the search was cut by ``time_limit``; a warning names such layers), ``status`` (``permuted``,
    ``unchanged`` or ``skipped: <reason>``).
    """
    rows = []
    for pair in find_pairs(model):
        if only is not None and pair.consumer not in only:
            continue
        row = {"producer": pair.producer, "consumer": pair.consumer, "pattern": "", "kept_before": None,
               "kept_after": None, "total": None, "recovered": 0.0, "swaps": 0, "seconds": 0.0, "hit_limit": False}
        cons = model.get_submodule(pair.consumer)
        nm = _consumer_nm(cons, n, m)
        problem = pair.problem
        if problem is None and nm is None:
            problem = "no single N:M pattern for the consumer"
        if problem is None and cons.weight.shape[1] % nm[1]:
            problem = f"input channels {cons.weight.shape[1]} not divisible by m={nm[1]}"
        if problem:
            row["status"] = f"skipped: {problem}"
            rows.append(row)
            continue
        perm, info = search_permutation(cons.weight, nm[0], nm[1], time_limit=time_limit, window=window)
        lost = info["total"] - info["kept_before"]
        row.update(pattern=f"{nm[0]}:{nm[1]}", kept_before=info["kept_before"], kept_after=info["kept_after"],
                   total=info["total"], swaps=info["swaps"], seconds=round(info["seconds"], 3),
                   hit_limit=info["hit_limit"],
                   recovered=(info["kept_after"] - info["kept_before"]) / lost if lost > 0 else 0.0)
        if info["kept_after"] > info["kept_before"]:
            apply_permutation_(model, pair, perm)
            row["status"] = "permuted"
        else:
            row["status"] = "unchanged"
        rows.append(row)
    for r in rows:
        _logger.info("permute %s -> %s %s: %s (recovered %.2f%% of lost magnitude%s)", r["producer"], r["consumer"],
                     r["pattern"], r["status"], 100 * r["recovered"],
                     f"; stopped at the {time_limit:g} s limit" if r.get("hit_limit") else "")
    cut = [r["consumer"] for r in rows if r.get("hit_limit")]
    if cut:
        _logger.warning("permutation search stopped at its %g s time limit for %d layer(s) (%s%s) before it "
                        "converged: how far it got, and so the masks, depend on this machine's speed and load; raise "
                        "permute_time_limit for a search that ends on its own and repeats exactly", time_limit,
                        len(cut), ", ".join(cut[:3]), ", ..." if len(cut) > 3 else "")
    return rows
