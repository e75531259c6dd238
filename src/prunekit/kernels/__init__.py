"""Optional fused CPU kernels for the hot loops of CPU training and of pruning events (see ``cpu.cpp``).

* :func:`score_step_`: a gradient criterion's per-step update, ``S ← m·S + tile_sum(|W·G|)``, in one pass
  (eager PyTorch needs four: product, ``abs``, tile sum, momentum add).
* :func:`radix_hist_`: one radix-select histogram pass over the keys with a given prefix, in one read (eager
  PyTorch narrows to the prefix with a comparison and a boolean index over every key first).
* :func:`nm_lowest` / :func:`nm_keep`: an N:M event's choice of the N lowest of every group and the mask built
  from it, in one pass each (eager PyTorch compares every pair of positions over the whole tensor).

They are compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler is needed; about a minute once,
announced by one line on stderr), or ahead of time with ``python -m prunekit.kernels build``. A build is cached under a name
that hashes everything it depends on -- the source, the torch build, the compiler and its flags, the Python ABI
(:func:`build_key`) -- in :func:`cache_root` (``$PRUNEKIT_CACHE/kernels``, else ``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/prunekit/kernels``), so every virtualenv with the same torch and Python loads the same build without
compiling, and a different torch never loads a stale one. Every caller keeps its eager path: :func:`cpu_kernels` returns None when the build fails (one warning says why) or when
``PRUNEKIT_CPU_KERNELS=0`` is set, and each wrapper declines tensors it does not cover (GPU — checked before any
build —, other dtypes, non-contiguous). The two paths agree up to float summation order, so a machine without a
compiler loses speed, not pruning decisions.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

logger = logging.getLogger("prunekit")

ENV_SWITCH = "PRUNEKIT_CPU_KERNELS"
ENV_CACHE = "PRUNEKIT_CACHE"
CFLAGS = ("-O3",)
_SOURCE = Path(__file__).with_name("cpu.cpp")
_NAME = "prunekit_cpu_kernels"
#: a build lock older than this belongs to a process that died while compiling
STALE_LOCK_S = 900.0
#: what the one-line notice promises (measured: 30-50 s on a quiet 2-core machine, 130-170 s on a loaded one)
EXPECTED_BUILD = "about a minute, longer on a busy machine"


def enabled() -> bool:
    """Whether the kernels may be used (``PRUNEKIT_CPU_KERNELS`` is not ``0``/``false``/``off``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def build_key(source: bytes, torch_version: str, cflags: Sequence[str], python_abi: str,
              compiler: str = "c++") -> str:
    """The cache key of a build: equal exactly when the inputs that decide the compiled library are equal.

    ``torch_version`` names the torch build (version and git revision: its headers and C++ ABI), ``python_abi`` the
    extension suffix (``.cpython-311-x86_64-linux-gnu.so``); where a virtualenv lives is not an input, so
    identical builds are shared between virtualenvs.
    """
    digest = hashlib.sha256()
    for part in (source, torch_version.encode(), *(f.encode() for f in cflags), python_abi.encode(),
                 compiler.encode()):
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two input lists hash alike
        digest.update(part)
    return digest.hexdigest()[:16]


def _current_key() -> str:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return build_key(_SOURCE.read_bytes(), f"{torch.__version__}+{torch.version.git_version}",
                     [*CFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"],
                     f"{sysconfig.get_config_var('EXT_SUFFIX')}/{platform.machine()}",
                     os.environ.get("CXX", "c++"))


def cache_root() -> Path:
    """Where builds are kept: ``$PRUNEKIT_CACHE/kernels``, else ``$TORCH_EXTENSIONS_DIR``, else
    ``$XDG_CACHE_HOME/prunekit/kernels`` (``~/.cache/prunekit/kernels``)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser() / "kernels"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "prunekit" / "kernels"


def build_dir() -> Path:
    """The folder of the build for this source, torch, compiler and Python."""
    return cache_root() / f"{_NAME}_{_current_key()}"


def _library(directory: Path) -> Path:
    return directory / f"{directory.name}.so"  # the name torch.utils.cpp_extension gives it (Linux, macOS)


def _import(directory: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(directory.name, _library(directory))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {_library(directory)}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notice(message: str) -> None:
    # stderr, not only logging: a first step that compiles for a minute must not look like a hang
    print(message, file=sys.stderr, flush=True)
    logger.info(message)


def _compile(directory: Path) -> ModuleType:
    """Build into a private folder, then move it into place in one rename: a process that finds the folder finds
    a finished library (two processes building at once both succeed; the second's copy is dropped)."""
    from torch.utils.cpp_extension import load

    staging = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        module = load(name=directory.name, sources=[str(_SOURCE)], extra_cflags=list(CFLAGS),
                      build_directory=str(staging), verbose=False)
        try:
            os.replace(staging, directory)
        except OSError:  # another process finished first: its build is the same
            pass
        return module
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # left only when the rename did not happen


def _compile_once(directory: Path) -> ModuleType | None:
    """Compile unless another process is doing it (DDP ranks, parallel test workers): one holds a lock file, the
    others wait for its library. Returns None when another process built it."""
    lock = directory.with_name(directory.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _library(directory).is_file():
                return None
            try:
                if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                    lock.unlink()  # its builder was killed: take over
            except FileNotFoundError:
                pass
            time.sleep(0.5)
            continue
        os.close(fd)
        try:
            return None if _library(directory).is_file() else _compile(directory)
        finally:
            lock.unlink(missing_ok=True)


def build(force: bool = False) -> tuple[ModuleType, Path, float]:
    """Load the cached build, or compile it (announced on stderr). Returns (module, folder, seconds spent
    compiling; 0.0 when it was cached). Raises whatever the build raises."""
    directory = build_dir()
    if force:
        shutil.rmtree(directory, ignore_errors=True)
    if _library(directory).is_file():
        try:
            return _import(directory), directory, 0.0
        except ImportError as exc:  # a damaged cache entry: build it again
            logger.info("prunekit: rebuilding the CPU kernels in %s (%s)", directory, exc)
            shutil.rmtree(directory, ignore_errors=True)
    _notice(f"prunekit: compiling the optional CPU kernels once for torch {torch.__version__} and "
            f"{sys.implementation.cache_tag} ({EXPECTED_BUILD}; kept in {directory} for every virtualenv with "
            f"the same torch and Python; `python -m prunekit.kernels build` does it ahead, {ENV_SWITCH}=0 "
            f"skips it)")
    began = time.perf_counter()
    module = _compile_once(directory)
    seconds = time.perf_counter() - began
    if module is None:  # another process compiled it meanwhile
        return _import(directory), directory, 0.0
    _notice(f"prunekit: CPU kernels compiled in {seconds:.0f} s")
    return module, directory, seconds


@lru_cache(maxsize=1)
def _build() -> ModuleType | None:
    # once per process: the compiled module is immutable, and a failed build is not retried on every step
    try:
        return build()[0]
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


__all__ = ["ENV_SWITCH", "ENV_CACHE", "enabled", "build", "build_key", "build_dir", "cache_root", "cpu_kernels", "score_step_", "radix_hist_", "nm_lowest", "nm_keep"]
