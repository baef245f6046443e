"""The optional native CPU kernels (``csrc/nm_rank.c``: N:M masks, SR-STE's and USD's weight gradients and the
products by a frozen mask; ``csrc/tiles.c``:
supermask's tile expansion and backward; ``csrc/gumbel.c``: gumbel's sampled weight, its backward and argmax masks):
built on first use, cached, loaded with ctypes.

Exact N:M masks over every selected weight are the sparse path's biggest per-step cost on CPU. In eager PyTorch
they take a key pass plus ``m - 1`` duels of three ops each (about nine passes over the weights); the C kernel
reads each weight once and writes the mask and the forward's weight (``W * E``, or MDGF's decayed weight; the 0/1
factor on request) in the same pass, on ``torch.get_num_threads()`` threads of torch's OpenMP pool. Semantics are
identical (tests compare the two bit for bit).

It is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a per-user cache keyed by
the source, the flags and the CPU's feature flags (``-march=native`` code must not meet another CPU), written
atomically. No compiler, a failed build or ``SPARSITY_NATIVE=0`` in the environment: :func:`kernel` returns None
and :mod:`sparsity.masks` uses its torch implementation; the reason is logged once and kept in :func:`status`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch.autograd.graph import increment_version

__all__ = ["kernel", "status", "NativeBatch", "AdamWStep", "supports", "tile_supports", "TileExpand",
           "tile_backward_native", "TileTopk", "counts_array", "srste_grad_native", "usd_grad_native",
           "mask_mul_native", "mask_mul_native_", "GumbelUnit", "gumbel_noise_native"]

_log = logging.getLogger(__name__)
_SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("nm_rank.c", "tiles.c", "gumbel.c"))
# -ffp-contract=off: no fused multiply-add where the source multiplies then adds (gcc already keeps them apart under
# -std=c11, clang does not): the kernels' results are bit for bit those of the torch ops they replace.
# -fno-trapping-math: float compares may run unconditionally, so selects on them vectorize (values are unchanged)
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=c11", "-ffp-contract=off", "-fno-trapping-math"]
_ONE_F32 = 0x3F800000  # bit pattern of 1.0f: the factor's "kept"
#: longest group block (m * T elements, T = the run of one group position) the kernel's stack buffer holds
MAX_BLOCK = 2048

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("SPARSITY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparsity-timm")
    return Path(root)


def _compile(cc: str, flags: list[str]) -> Path:
    """The shared library built from the sources with ``flags``, from the cache when it is there."""
    source = b"".join(path.read_bytes() for path in _SOURCES)
    key = hashlib.sha256(source + " ".join([cc, *flags, platform.machine(), _cpu_flags()]).encode()).hexdigest()
    target = _cache_dir() / f"kernels-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, target)  # atomic: concurrent builders (DDP ranks) each publish a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    errors = []
    # OpenMP first: libgomp.so.1 is already loaded by torch, so the kernel runs on torch's own (hot) thread pool
    # instead of a second one fighting torch's spinning workers; plain pthreads where -fopenmp is not supported.
    for flags in ([*_FLAGS, "-fopenmp"], _FLAGS):
        try:
            lib = ctypes.CDLL(str(_compile(cc, flags)))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
    else:
        raise RuntimeError("; ".join(errors))
    fn = lib.nm_keep
    p = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int64, p, p, p, p, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint64,
                   ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.nm_keep_adamw.argtypes = [ctypes.c_int64, p, p, p, p, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_uint64,
                                  ctypes.c_float, p, ctypes.c_int]
    lib.nm_keep_adamw.restype = ctypes.c_int
    i64 = ctypes.c_int64
    lib.tile_expand.argtypes = [i64, p, p, p, p, p, p, p, ctypes.c_int]
    lib.tile_expand.restype = ctypes.c_int
    lib.tile_backward.argtypes = [i64, p, p, p, p, p, p, p, p, ctypes.c_int]
    lib.tile_backward.restype = ctypes.c_int
    lib.srste_grad.argtypes = [i64, p, p, p, p, ctypes.c_float, ctypes.c_int]
    lib.srste_grad.restype = ctypes.c_int
    lib.usd_grad.argtypes = [i64, i64, p, p, p, p, p, p, ctypes.c_int]
    lib.usd_grad.restype = ctypes.c_int
    lib.mask_mul.argtypes = [i64, p, p, p, ctypes.c_int]
    lib.mask_mul.restype = ctypes.c_int
    lib.mask_mul_inplace.argtypes = [i64, p, p, ctypes.c_int]
    lib.mask_mul_inplace.restype = ctypes.c_int
    lib.tile_topk.argtypes = [i64, p, p, p, p, ctypes.c_int]
    lib.tile_topk.restype = ctypes.c_int
    u64, f32, int_ = ctypes.c_uint64, ctypes.c_float, ctypes.c_int
    lib.gumbel_forward.argtypes = [i64, i64, i64, int_, int_, p, p, p, p, p, u64, f32, int_]
    lib.gumbel_backward.argtypes = [i64, i64, i64, int_, int_, p, p, p, p, p, p, f32, int_]
    lib.gumbel_argmax_mask.argtypes = [i64, i64, i64, int_, int_, p, p, p, int_]
    lib.gumbel_noise_range.argtypes = [u64, i64, i64, p]
    for name in ("gumbel_forward", "gumbel_backward", "gumbel_argmax_mask", "gumbel_noise_range"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None when it is disabled or cannot be built."""
    global _lib, _status
    if _status is not None:
        return _lib
    with _lock:
        if _status is not None:
            return _lib
        if os.environ.get("SPARSITY_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _status = "disabled by SPARSITY_NATIVE=0"
        else:
            try:
                _lib = _build()
                _status = "loaded"
            except Exception as exc:  # noqa: BLE001 - any failure means: use the torch path
                _lib = None
                _status = f"unavailable ({exc}); masks use the torch implementation"
                _log.info("native mask kernels %s", _status)
    return _lib


def status() -> str:
    """``loaded``, ``disabled by ...`` or ``unavailable (why)``; builds the kernel if not tried yet."""
    kernel()
    return _status or "not tried"


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def supports(block: torch.Tensor) -> bool:
    """Whether the kernel handles an (A, m, T) weight block: float32 on CPU, m in {2, 4, 8}, contiguous, m * T at
    most :data:`MAX_BLOCK`. Everything else is ranked by the torch implementation."""
    return (block.device.type == "cpu" and block.dtype == torch.float32 and block.shape[1] in (2, 4, 8)
            and block.shape[1] * block.shape[2] <= MAX_BLOCK and block.is_contiguous())


class _PreparedCall:
    """A kernel call whose pointer arrays are built once, so a caller that keeps it (the same tensors every step)
    pays only the call. ``_call(fn, *extra)`` runs ``fn(*self._args, *extra, threads)`` and bumps the version
    counters of ``self._written``: writes through raw pointers bypass autograd's counters, and caches keyed on
    them (the mask factor, the precomputed W * E) and saved-tensor checks must see the change."""

    units: list[tuple]
    _args: tuple
    _written: list[torch.Tensor]

    def _call(self, fn: str, *extra) -> bool:
        """False if the kernel is unavailable or refuses the arguments (nothing written then)."""
        lib = kernel()
        if lib is None or not self.units or getattr(lib, fn)(*self._args, *extra, torch.get_num_threads()) != 0:
            return False
        increment_version(self._written)
        return True


class NativeBatch(_PreparedCall):
    """One N:M kernel call over ``units`` of (mask, factor or None, masked or None, weight): contiguous (A, m, T)
    block views of one shape per unit, float32 on CPU (bool mask)."""

    def __init__(self, units: list[tuple], n: int, m: int) -> None:
        self.units, self.n, self.m = units, n, m
        self._args = (
            len(units), _ptrs([u[3] for u in units]), _ptrs([u[0] for u in units]), _ptrs([u[1] for u in units]),
            _ptrs([u[2] for u in units]), _int64s(u[3].shape[0] for u in units),
            _int64s(u[3].shape[2] for u in units), m, n, 4, _ONE_F32,
        )
        self._written = [t for u in units for t in u[:3] if t is not None]

    def run(self, beta: float = 0.0) -> bool:
        """Compute the masks (``masked`` outputs: ``W * (E + beta (1 - E))``); False if nothing was written."""
        return self._call("nm_keep", beta)

    def run_adamw(self, beta: float, steps: ctypes.Array, written: list[torch.Tensor]) -> bool:
        """Take every unit's weights one AdamW step first (``steps[u]``: an :class:`AdamWStep` over the unit's
        elements), then compute the masks from the updated weights, in one pass; ``written`` (the weights and
        moments it updates) get their version counters bumped. False if nothing was written."""
        lib = kernel()
        if lib is None or len(steps) != len(self.units):
            return False
        a = self._args
        if lib.nm_keep_adamw(*a[:9], a[10], beta, steps, torch.get_num_threads()) != 0:
            return False
        increment_version(self._written + written)
        return True


class AdamWStep(ctypes.Structure):
    """One unit's AdamW step for :meth:`NativeBatch.run_adamw` (``adamw_t`` in ``csrc/nm_rank.c``): pointers to
    the unit's gradient and moments and the step's float32 scalars; ``lam`` != 0 adds SR-STE's decay to the
    gradient first."""

    _fields_ = [("g", ctypes.c_void_p), ("m", ctypes.c_void_p), ("v", ctypes.c_void_p), ("wdmul", ctypes.c_float),
                ("c1", ctypes.c_float), ("beta2", ctypes.c_float), ("c2", ctypes.c_float),
                ("bc2_sqrt", ctypes.c_float), ("eps", ctypes.c_float), ("neg_step", ctypes.c_float),
                ("lam", ctypes.c_float)]


def _int64s(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


def tile_supports(*tensors: torch.Tensor | None) -> bool:
    """Whether the tile kernels take these tensors: float32 (or the uint8/bool masks) on CPU, contiguous."""
    ok = (torch.float32, torch.bool, torch.uint8)
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous() and t.dtype in ok) for t in tensors) \
        and kernel() is not None  # tensors first: a GPU run never builds the C kernel


class TileExpand(_PreparedCall):
    """Supermask's mask step prepared for ``units`` of (weight, mask, masked, keep, tile): weight/masked float32 and
    mask bool, each a contiguous (rows, cols) view; keep bool (ceil(rows/tile), ceil(cols/tile)). ``run()`` writes
    the expanded mask and ``masked`` = W * E in one pass."""

    def __init__(self, units: list[tuple]) -> None:
        self.units = units
        self._args = (
            len(units), _ptrs([u[0] for u in units]), _ptrs([u[1] for u in units]), _ptrs([u[2] for u in units]),
            _ptrs([u[3] for u in units]), _int64s(u[0].shape[0] for u in units),
            _int64s(u[0].shape[1] for u in units), _int64s(u[4] for u in units),
        )
        self._written = [t for u in units for t in u[1:3]]

    def run(self) -> bool:
        """False if the kernel is unavailable or refuses the arguments (nothing written then)."""
        return self._call("tile_expand")


def tile_backward_native(units: list[tuple]) -> bool:
    """Supermask's backward for ``units`` of (grad, weight, keep, grad_weight or None, grad_scores or None, tile):
    ``grad_weight`` = g * E and ``grad_scores`` = the sum of g * W over every tile, in one pass (float32, contiguous
    (rows, cols) views; grad_scores (ceil(rows/tile), ceil(cols/tile))). False if nothing was written."""
    lib = kernel()
    if lib is None or not units:
        return False
    rc = lib.tile_backward(
        len(units), _ptrs([u[0] for u in units]), _ptrs([u[1] for u in units]), _ptrs([u[2] for u in units]),
        _ptrs([u[3] for u in units]), _ptrs([u[4] for u in units]), _int64s(u[0].shape[0] for u in units),
        _int64s(u[0].shape[1] for u in units), _int64s(u[5] for u in units), torch.get_num_threads(),
    )
    return rc == 0


class TileTopk(_PreparedCall):
    """Supermask's tile selection prepared for ``units`` of (scores, keep): ``run(counts)`` marks in each ``keep``
    (bool, contiguous, the shape of ``scores``) the ``counts[i]`` largest scores, ties to the lower index, NaN
    ranking as +inf: what :func:`sparsity.masks.tile_mask` computes, for every unit in one call. Use
    :meth:`create`, which declines what the kernel does not take (scores not float32 contiguous on CPU)."""

    def __init__(self, units: list[tuple]) -> None:
        self.units = units
        self._args = (len(units), _ptrs([u[0] for u in units]), _ptrs([u[1] for u in units]),
                      _int64s(u[0].numel() for u in units))
        self.keeps = self._written = [u[1] for u in units]

    @classmethod
    def create(cls, units: list[tuple]) -> TileTopk | None:
        if not units or not all(s.dtype == torch.float32 and k.shape == s.shape and k.dtype == torch.bool
                                for s, k in units) or not tile_supports(*(t for u in units for t in u)):
            return None
        return cls(units)

    def run(self, counts: ctypes.Array) -> bool:
        """``counts``: one kept-tile count per unit, as :func:`counts_array` makes it once (not every step). False
        if the kernel is unavailable (nothing written then)."""
        return self._call("tile_topk", counts)


def counts_array(counts) -> ctypes.Array:
    """Kept-tile counts for :meth:`TileTopk.run`."""
    return _int64s(counts)


def _masked_floats(mask: torch.Tensor, *xs: torch.Tensor) -> bool:
    """Whether the one-pass mask kernels take these: a bool ``mask`` and float32 ``xs`` of its shape, contiguous on
    CPU, with the kernel library loaded."""
    return mask.dtype == torch.bool and all(x.dtype == torch.float32 and x.shape == mask.shape for x in xs) \
        and tile_supports(mask, *xs)


def srste_grad_native(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor | None:
    """SR-STE's weight gradient ``g + lam * (1 - E) * W`` in one pass over the gradient, the weight and the 1-byte
    mask (the torch ops take two passes and read the weight-sized ``W * E``), into a new tensor. None when the
    kernel does not take these tensors (not float32 CPU, not contiguous, shapes differ) or is unavailable."""
    if not _masked_floats(mask, grad, weight):
        return None
    out = torch.empty_like(grad)
    rc = kernel().srste_grad(grad.numel(), grad.data_ptr(), weight.data_ptr(), mask.data_ptr(), out.data_ptr(),
                             lam, torch.get_num_threads())
    return out if rc == 0 else None


def mask_mul_native(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """``x * E`` with ``E`` the bool ``mask`` as an exact 0/1 factor, into a new tensor in one pass reading one byte
    per mask element (a frozen mask's W * E or g * E): the float-factor product's values. None when the kernel
    does not take these tensors (not float32 CPU, not contiguous, shapes differ)."""
    if not _masked_floats(mask, x):
        return None
    out = torch.empty_like(x)
    return out if kernel().mask_mul(x.numel(), x.data_ptr(), mask.data_ptr(), out.data_ptr(),
                                    torch.get_num_threads()) == 0 else None


def mask_mul_native_(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """``x *= E`` in place (``mask`` bool, an exact 0/1 factor), bumping ``x``'s version counter like ``mul_``;
    False (nothing written) when the kernel does not take these tensors."""
    if not _masked_floats(mask, x):
        return False
    if kernel().mask_mul_inplace(x.numel(), x.data_ptr(), mask.data_ptr(), torch.get_num_threads()) != 0:
        return False
    increment_version(x)
    return True


def usd_grad_native(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor,
                    tau: torch.Tensor) -> torch.Tensor | None:
    """USD's search gradient ``g * E + coef * W * (|W| < tau)`` (``coef``, ``tau``: one value per output row) in
    one pass over the gradient, the weight and the 1-byte mask, into a new tensor: the torch expression's values.
    None when the kernel does not take these tensors (not float32 CPU, not contiguous, shapes differ)."""
    rows = weight.shape[0] if weight.dim() else 0
    if not (_masked_floats(mask, grad, weight) and coef.dtype == tau.dtype == torch.float32
            and coef.numel() == tau.numel() == rows > 0 and tile_supports(coef, tau)):
        return None
    out = torch.empty_like(grad)
    rc = kernel().usd_grad(rows, weight.numel() // rows, grad.data_ptr(), weight.data_ptr(), mask.data_ptr(),
                           coef.data_ptr(), tau.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


class GumbelUnit:
    """``csrc/gumbel.c`` for one gumbel unit: its weight rows seen as an (A, C, T) block grouped by ``m`` along C,
    its logits (A, T, C / m, K) and the (K, m) pattern table. Use :meth:`create`, which declines what the kernels
    do not take (not float32 on CPU, neither contiguous nor a channels-last conv weight grouped along its input
    channels, more than 70 patterns, m over 64, no kernel library). A unit keeps the library it was made with, so a
    forward's backward runs on it whatever happens to :func:`kernel` in between."""

    def __init__(self, a: int, c: int, t: int, table: torch.Tensor, lib: ctypes.CDLL,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.a, self.c, self.t = a, c, t
        self.k, self.m = table.shape
        self.table = table.to(torch.uint8).contiguous()
        self.lib, self.memory_format = lib, memory_format

    @classmethod
    def create(cls, w: torch.Tensor, logits: torch.Tensor, dim: int, table: torch.Tensor) -> GumbelUnit | None:
        k, m = table.shape
        if not (w.dtype == logits.dtype == torch.float32 and w.device.type == logits.device.type == "cpu"
                and logits.is_contiguous() and k <= 70 and m <= 64 and w.shape[dim] % m == 0):
            return None
        if w.is_contiguous():
            a, c, t, fmt = math.prod(w.shape[:dim]), w.shape[dim], math.prod(w.shape[dim + 1:]), torch.contiguous_format
        elif w.dim() == 4 and dim == 1 and w.is_contiguous(memory_format=torch.channels_last):
            # (O, kh, kw, I) in memory: input channels are the innermost run, the logits' own order
            a, c, t, fmt = w.shape[0] * w.shape[2] * w.shape[3], w.shape[1], 1, torch.channels_last
        else:
            return None
        lib = kernel()
        if lib is None or logits.numel() != a * t * (c // m) * k:
            return None
        return cls(a, c, t, table, lib, fmt)

    def _geometry(self) -> tuple:
        return self.a, self.c, self.t, self.m, self.k, self.table.data_ptr()

    def forward(self, w: torch.Tensor, logits: torch.Tensor, seed: int, tau: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``W * P[argmax s]``, s = ``(logits + G) / tau``) with the counter noise of ``seed`` (new tensors)."""
        out, s = torch.empty_like(w), torch.empty_like(logits)  # out in w's memory format
        rc = self.lib.gumbel_forward(*self._geometry(), w.data_ptr(), logits.data_ptr(), out.data_ptr(),
                                     s.data_ptr(), noise_key(seed), tau, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"gumbel_forward refused its arguments (rc {rc})")
        return out, s

    def backward(self, w: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, tau: float, want_w: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dL/dlogits through the soft sample, ``g * P[z]`` when ``want_w``) from the forward's ``s`` and the
        gradient ``grad`` of its output."""
        grad = grad.contiguous(memory_format=self.memory_format)
        dlogits = torch.empty_like(s)
        dw = torch.empty_like(w) if want_w else None
        rc = self.lib.gumbel_backward(*self._geometry(), w.data_ptr(), s.data_ptr(), grad.data_ptr(),
                                      dlogits.data_ptr(), 0 if dw is None else dw.data_ptr(), tau,
                                      torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"gumbel_backward refused its arguments (rc {rc})")
        return dlogits, dw

    def argmax_mask(self, logits: torch.Tensor, mask: torch.Tensor) -> bool:
        """Write ``P[argmax logits]`` into ``mask`` (bool, the weight's shape and memory format); False if not
        taken."""
        if not (mask.dtype == torch.bool and mask.device.type == "cpu"
                and mask.is_contiguous(memory_format=self.memory_format)):
            return False
        rc = self.lib.gumbel_argmax_mask(*self._geometry(), logits.data_ptr(), mask.data_ptr(),
                                         torch.get_num_threads())
        if rc == 0:
            increment_version(mask)
        return rc == 0


_MASK64 = (1 << 64) - 1
#: SplitMix64's counter increment and finalizer multipliers (``csrc/gumbel.c``'s GOLDEN and mix64)
SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def noise_key(seed: int) -> int:
    """The counter stream's key for ``seed``: SplitMix64's finalizer of the seed (what ``csrc/gumbel.c`` adds the
    scaled counter to)."""
    z = seed & _MASK64
    z = ((z ^ (z >> 30)) * SPLITMIX[1]) & _MASK64
    z = ((z ^ (z >> 27)) * SPLITMIX[2]) & _MASK64
    return z ^ (z >> 31)


def gumbel_noise_native(numel: int, seed: int, first: int = 0) -> torch.Tensor | None:
    """Gumbel noise of logit numbers ``[first, first + numel)`` of ``seed``'s counter stream (float32, CPU); None
    without the kernel library."""
    lib = kernel()
    if lib is None:
        return None
    out = torch.empty(numel, dtype=torch.float32)
    if lib.gumbel_noise_range(noise_key(seed), first, numel, out.data_ptr()) != 0:
        return None
    return out
