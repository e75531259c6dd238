"""Optional fused CPU kernels for the hot loops of CPU training and of pruning events (see ``cpu.cpp``).

* :func:`score_step_`: a gradient criterion's per-step update, ``S ← m·S + tile_sum(|W·G|)``, in one pass
  (eager PyTorch needs four: product, ``abs``, tile sum, momentum add).
* :func:`radix_hist_`: one radix-select histogram pass over the keys with a given prefix, in one read (eager
  PyTorch narrows to the prefix with a comparison and a boolean index over every key first).
* :func:`nm_lowest` / :func:`nm_keep`: an N:M event's choice of the N lowest of every group and the mask built
  from it, in one pass each (eager PyTorch compares every pair of positions over the whole tensor).

They are compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler is needed; ~30 s once, then
cached in torch's extension directory, ``$TORCH_EXTENSIONS_DIR`` by default). Every caller keeps its eager
path: :func:`cpu_kernels` returns None when the build fails (one warning says why) or when
``PRUNEKIT_CPU_KERNELS=0`` is set, and each wrapper declines tensors it does not cover (GPU — checked before any
build —, other dtypes, non-contiguous). The two paths agree up to float summation order, so a machine without a
compiler loses speed, not pruning decisions.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("prunekit")

ENV_SWITCH = "PRUNEKIT_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("cpu.cpp")


def enabled() -> bool:
    """Whether the kernels may be used (``PRUNEKIT_CPU_KERNELS`` is not ``0``/``false``/``off``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


@lru_cache(maxsize=1)
def _build() -> ModuleType | None:
    # once per process: the compiled module is immutable, and a failed build is not retried on every step
    try:
        from torch.utils.cpp_extension import load

        # the source's hash in the name: an edited source never loads a stale build
        name = "prunekit_cpu_kernels_" + hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:12]
        logger.info("prunekit: building the CPU kernels (once; cached by torch.utils.cpp_extension)")
        return load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build problem means: use the eager path
        warnings.warn(f"prunekit: CPU kernels unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      f"using the eager PyTorch path (same pruning, slower). Set {ENV_SWITCH}=0 to skip the build.",
                      RuntimeWarning, stacklevel=2)
        return None


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels, or None (disabled, or the build failed)."""
    return _build() if enabled() else None


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


def score_step_(weight: torch.Tensor | None, grad: torch.Tensor, scores: torch.Tensor,
                tiles: tuple[int, int, int, int], momentum: float, keep: torch.Tensor | None = None) -> bool:
    """``scores ← momentum·scores + tile_sum(|weight·grad|)`` (``|grad|`` without weight), in place; then,
    with ``keep`` (float, laid out like ``scores``), ``grad`` times its tile's keep value.

    ``tiles`` = (rows, cols, tile rows, tile cols): ``grad`` and ``weight`` read as a (rows, cols) matrix,
    ``scores`` and ``keep`` as (rows / tile rows, cols / tile cols). Returns False, touching nothing, when the
    kernels are unavailable or a tensor is not plain CPU float32 (the caller then runs its eager path).
    """
    if grad.device.type != "cpu":
        return False
    ext = cpu_kernels()
    if ext is None or not _plain(grad, torch.float32) or not _plain(scores, torch.float32) \
            or (weight is not None and not _plain(weight, torch.float32)) \
            or (keep is not None and not _plain(keep, torch.float32)):
        return False
    rows, cols, bh, bw = tiles
    tiled = (rows // bh, cols // bw)
    ext.score_step_(None if weight is None else weight.view(rows, cols), grad.view(rows, cols),
                    scores.view(tiled), bh, bw, float(momentum), None if keep is None else keep.view(tiled))
    return True


def radix_hist_(keys: torch.Tensor, hist: torch.Tensor, done: int, prefix: int, width: int) -> bool:
    """``hist[d] += #{keys with top ``done`` bits == prefix and next ``width`` bits == d}`` (the first pass,
    ``done == 0``, offsets the signed top digit by ``2**width / 2``). False when unavailable (nothing touched)."""
    if keys.device.type != "cpu":
        return False
    ext = cpu_kernels()
    if ext is None or not _plain(keys, torch.int32) or not _plain(hist, torch.int64):
        return False
    ext.radix_hist_(keys, hist, int(done), int(prefix), int(width))
    return True


_REDUCE = {"sum": 0, "mean": 1, "max": 2}


def nm_lowest(scores: torch.Tensor, n: int, m: int, reduce: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For each group of ``m`` consecutive scores (flat order): the ``n`` lowest as a bit set (int32, bit i =
    position i; ties go to the lower index) and the group's score over them (``sum``/``mean``/``max``).
    None when the kernels are unavailable or do not cover the input (the caller runs its eager path)."""
    if scores.device.type != "cpu" or m > 16 or reduce not in _REDUCE:
        return None
    ext = cpu_kernels()
    if ext is None or not _plain(scores, torch.float32):
        return None
    unit, bits = ext.nm_lowest(scores.reshape(-1), int(n), int(m), _REDUCE[reduce])
    return unit, bits


def nm_keep(bits: torch.Tensor, pruned: torch.Tensor, m: int) -> torch.Tensor | None:
    """The flat N:M keep-mask: position i of group g is cut when ``pruned[g]`` and bit i of ``bits[g]``."""
    if bits.device.type != "cpu":  # checked before cpu_kernels(): GPU work never triggers the build
        return None
    ext = cpu_kernels()
    if ext is None or not _plain(bits, torch.int32):
        return None
    return ext.nm_keep(bits, pruned.to(device="cpu", dtype=torch.bool).contiguous().reshape(-1), int(m))


__all__ = ["ENV_SWITCH", "enabled", "cpu_kernels", "score_step_", "radix_hist_", "nm_lowest", "nm_keep"]
