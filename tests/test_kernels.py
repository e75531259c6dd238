"""The optional fused CPU kernels (prunekit.kernels) against the eager PyTorch path they replace."""
from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit
from prunekit import kernels
from prunekit.criteria import CRITERIA
from prunekit.patterns import parse_pattern
from prunekit.layouts import WeightLayout
from prunekit.masks import PrunedLayer
from prunekit.ranking import _hist_pass

from conftest import MLP

HYP = settings(max_examples=40, deadline=None)
LINEAR_LAYOUT = WeightLayout(out_axis=0, in_axis=1)


@pytest.fixture(scope="module")
def ext():
    module = kernels.cpu_kernels()
    if module is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail("a C++ compiler is installed but the prunekit CPU kernels did not build")
        pytest.skip("no C++ compiler: the eager path is the only one")
    return module


def eager_hist(keys: torch.Tensor, done: int, prefix: int, width: int) -> torch.Tensor:
    bins = 1 << width
    shift = 32 - done - width
    if done:
        keys = keys[(keys >> (32 - done)) == prefix]
        return torch.bincount((keys >> shift) & (bins - 1), minlength=bins)
    return torch.bincount((keys >> shift) + (bins >> 1), minlength=bins)


@HYP
@given(values=st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=300),
       width=st.sampled_from([10, 11]), done=st.sampled_from([0, 11, 21]), pick=st.integers(0, 299))
def test_radix_hist_matches_bincount(ext, values, width, done, pick):
    keys = torch.tensor(values, dtype=torch.int32)
    prefix = int(keys[pick % len(values)]) >> (32 - done) if done else 0
    hist = torch.zeros(1 << width, dtype=torch.int64)
    assert kernels.radix_hist_(keys, hist, done, prefix, width)
    assert torch.equal(hist, eager_hist(keys, done, prefix, width))
    again = hist.clone()
    kernels.radix_hist_(keys, hist, done, prefix, width)  # accumulates, like the eager `+=`
    assert torch.equal(hist, 2 * again)


@HYP
@given(tile_rows=st.integers(1, 5), tile_cols=st.integers(1, 5), row_tiles=st.integers(1, 6),
       col_tiles=st.integers(1, 6), weighted=st.booleans(), momentum=st.sampled_from([0.0, 0.9]),
       masked=st.booleans())
def test_score_step_matches_eager_tile_sums(ext, tile_rows, tile_cols, row_tiles, col_tiles, weighted, momentum,
                                            masked):
    rows, cols = tile_rows * row_tiles, tile_cols * col_tiles
    w, g = torch.randn(rows, cols), torch.randn(rows, cols)
    grad_before = g.clone()
    old = torch.rand(row_tiles, col_tiles)
    keep = (torch.rand(row_tiles, col_tiles) > 0.5).float() if masked else None
    # momentum 0 must not read the old scores at all: NaN there would leak into the result
    scores = torch.full_like(old, float("nan")) if momentum == 0.0 else old.clone()
    assert kernels.score_step_(w if weighted else None, g, scores, (rows, cols, tile_rows, tile_cols), momentum,
                               keep)
    term = (w * grad_before).abs() if weighted else grad_before.abs()  # scored from the unmasked gradient
    expected = term.view(row_tiles, tile_rows, col_tiles, tile_cols).sum(dim=(1, 3))
    if momentum:
        expected = expected + momentum * old
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    expected_grad = grad_before
    if masked:
        expected_grad = (grad_before.view(row_tiles, tile_rows, col_tiles, tile_cols)
                         * keep.view(row_tiles, 1, col_tiles, 1)).view(rows, cols)
    assert torch.equal(g, expected_grad)


def test_kernels_decline_what_they_do_not_cover(ext):
    scores = torch.zeros(2, 2)
    assert not kernels.score_step_(None, torch.zeros(4, 4, dtype=torch.float64), scores, (4, 4, 2, 2), 0.9)
    assert not kernels.score_step_(None, torch.zeros(4, 4).t(), scores, (4, 4, 2, 2), 0.9)  # not contiguous
    hist = torch.zeros(2048, dtype=torch.int64)
    assert not kernels.radix_hist_(torch.zeros(8, dtype=torch.int64), hist, 0, 0, 11)
    assert torch.count_nonzero(hist) == 0 and torch.count_nonzero(scores) == 0


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.cpu_kernels() is None
    hist = torch.zeros(4, dtype=torch.int64)
    assert not kernels.radix_hist_(torch.tensor([1, 2], dtype=torch.int32), hist, 0, 0, 2)
    _hist_pass(hist, torch.tensor([1, 2, -1], dtype=torch.int32), 0, 0, 2)  # the eager fallback still counts
    assert int(hist.sum()) == 3


@pytest.mark.parametrize("spec", ["1x1", "4x1", "2:4", "1xchannel", "channelx1"])
def test_patterns_declare_their_tiles(spec):
    bound = parse_pattern(spec).bind((16, 32), LINEAR_LAYOUT, "mean")
    rows, cols, th, tw = bound.tiles
    assert (rows, cols) == (16, 32)
    expected_tile = {"1x1": (1, 1), "4x1": (4, 1), "2:4": (1, 1), "1xchannel": (1, 32), "channelx1": (16, 1)}
    assert (th, tw) == expected_tile[spec]
    assert tuple(bound.score_shape) in ((16 // th, 1, 32 // tw, 1), (16, 32))
    assert parse_pattern("4x1").bind((16, 32), LINEAR_LAYOUT, "max").tiles is None  # max is not a tile sum


def test_a_subclass_with_its_own_term_leaves_the_kernel():
    class Custom(CRITERIA.get("snip_momentum")):
        def step_term(self, weight, grad, out):
            return torch.mul(weight, weight, out=out)

    assert Custom.fused_term is None and CRITERIA.get("snip_momentum").fused_term is True


def _train(pattern: str, target: float) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = MLP(sizes=(16, 32, 32, 32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"target_sparsity": target, "pattern": pattern, "pruning_type": "snip_momentum",
              "start_step": 2, "end_step": 12, "pruning_frequency": 2, "pruning_op_types": ["Linear"]}
    pruning = prunekit.prepare_pruning(model, config, opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(14):
        x = torch.randn(8, 16, generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [layer.mask.clone() for layer in pruning.layers], pruning.state_dict()


@pytest.mark.parametrize("pattern,target", [("1x1", 0.9), ("4x1", 0.75), ("2:4", 0.5)])
def test_training_with_and_without_kernels_gives_the_same_masks(ext, monkeypatch, pattern, target):
    import prunekit.criteria.base as criterion_base
    import prunekit.ranking as ranking

    used = {"score": 0, "hist": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            done = fn(*args, **kwargs)
            used[name] += int(done)
            return done
        return wrapper

    monkeypatch.setattr(criterion_base, "score_step_", counting("score", kernels.score_step_))
    real_keep = PrunedLayer.fused_keep
    monkeypatch.setattr(PrunedLayer, "fused_keep",
                        lambda self: (used.__setitem__("keep", used.get("keep", 0) + 1), real_keep(self))[1])
    monkeypatch.setattr(ranking, "radix_hist_", counting("hist", kernels.radix_hist_))
    fused_masks, fused_state = _train(pattern, target)
    assert used["score"] > 0 and used["hist"] > 0 and used["keep"] > 0, used  # the kernel path really ran
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    eager_masks, eager_state = _train(pattern, target)
    for a, b in zip(fused_masks, eager_masks):
        assert torch.equal(a, b)
    scores_a = fused_state["pruners"][0]["criterion"]["scores"]
    scores_b = eager_state["pruners"][0]["criterion"]["scores"]
    for name in scores_a:  # the same numbers up to float rounding (summation order differs)
        torch.testing.assert_close(scores_a[name], scores_b[name], rtol=1e-5, atol=1e-7)


@contextmanager
def build_replaced_by(monkeypatch, error: Exception | None, cache=None):
    """Every kernel build inside raises ``error`` (None: it "succeeds" without compiling, returning a stand-in
    module) and finds an empty cache (or ``cache``); the in-process build is forgotten before and after."""
    import tempfile
    import types

    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs)
        if error is not None:
            raise error
        return types.ModuleType(kwargs["name"])

    monkeypatch.setattr(cpp_extension, "load", load)
    with tempfile.TemporaryDirectory() as empty:
        monkeypatch.setenv(kernels.ENV_CACHE, str(cache or empty))
        kernels._build.cache_clear()
        try:
            yield calls
        finally:
            kernels._build.cache_clear()  # the next caller builds (or loads the cached build) again
            monkeypatch.undo()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    with build_replaced_by(monkeypatch, RuntimeError("no C++ compiler found")):
        with pytest.warns(RuntimeWarning, match="CPU kernels unavailable.*no C\\+\\+ compiler"):
            assert kernels.cpu_kernels() is None
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            assert kernels.cpu_kernels() is None
        assert not again  # the failed build is not retried on every step
        scores = torch.zeros(2, 2)
        assert not kernels.score_step_(None, torch.ones(2, 2), scores, (2, 2, 1, 1), 0.9)
        masks, _ = _train("4x1", 0.75)  # training still prunes, on the eager path
        assert all(m.dtype == torch.bool for m in masks) and any(not bool(m.all()) for m in masks)


@HYP
@given(n=st.integers(1, 8), m=st.sampled_from([2, 4, 8, 5, 16]), rows=st.integers(1, 4), groups=st.integers(1, 6),
       reduce=st.sampled_from(["sum", "mean", "max"]), ties=st.booleans(), data=st.data())
def test_nm_kernel_matches_the_eager_choice(ext, n, m, rows, groups, reduce, ties, data):
    n = min(n, m - 1)  # 0 < N < M
    shape = (rows, groups * m)
    scores = torch.randint(0, 3, shape).float() if ties else torch.rand(shape)  # ties: lower index first
    pruned = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows * groups, max_size=rows * groups)))
    results = {}
    for path in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(kernels.ENV_SWITCH, path)
            bound = parse_pattern(f"{n}:{m}").bind(shape, LINEAR_LAYOUT, reduce)
            unit = bound.unit_scores(scores)
            keep = bound.mask_from_pruned_units(pruned, scores)
        results[path] = (unit, keep)
        assert keep.shape == shape
        zeros_per_group = (~keep).view(rows, groups, m).sum(dim=2).reshape(-1)
        assert torch.equal(zeros_per_group, pruned.long() * n)  # exactly N zeros in every pruned group
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=0, atol=0)
    assert torch.equal(results["1"][1], results["0"][1])


def test_nm_kernel_declines_long_groups(ext):
    assert kernels.nm_lowest(torch.rand(2, 32), 16, 32, "sum") is None  # M > 16: eager argsort path


def test_non_cpu_tensors_never_trigger_the_build(monkeypatch):
    with build_replaced_by(monkeypatch, AssertionError("the kernels were built for a non-CPU tensor")):
        meta = torch.empty(4, 4, device="meta")
        assert not kernels.score_step_(meta, meta, torch.empty(4, 4, device="meta"), (4, 4, 1, 1), 0.9)
        assert not kernels.radix_hist_(torch.empty(8, dtype=torch.int32, device="meta"),
                                       torch.zeros(2048, dtype=torch.int64), 0, 0, 11)
        assert kernels.nm_lowest(torch.empty(4, 4, device="meta"), 2, 4, "sum") is None
        assert kernels.nm_keep(torch.empty(4, dtype=torch.int32, device="meta"),
                               torch.empty(4, dtype=torch.bool, device="meta"), 4) is None
        assert kernels._build.cache_info().currsize == 0


# --- first use: a visible notice, one build shared by identical environments (issue 13, item 16) -------------
KEY_INPUTS = dict(source=b"int main() {}", torch_version="2.13.0+cpu+abc", cflags=["-O3"],
                  python_abi=".cpython-311-x86_64-linux-gnu.so/x86_64", compiler="c++")


def test_the_build_key_is_the_same_for_the_same_inputs_and_differs_for_others():
    key = kernels.build_key(**KEY_INPUTS)
    assert key == kernels.build_key(**dict(KEY_INPUTS))
    for name, other in [("source", b"int main() { return 1; }"), ("torch_version", "2.14.0+cpu+def"),
                        ("cflags", ["-O2"]), ("python_abi", ".cpython-312-x86_64-linux-gnu.so/x86_64"),
                        ("compiler", "clang++")]:
        assert kernels.build_key(**{**KEY_INPUTS, name: other}) != key, name
    # inputs are length-prefixed: moving a boundary changes the key
    assert kernels.build_key(**{**KEY_INPUTS, "cflags": ["-O3", "-g"]}) != \
        kernels.build_key(**{**KEY_INPUTS, "cflags": ["-O3\0-g"]})


def test_the_build_folder_ignores_where_the_virtualenv_is(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    here = kernels.build_dir()
    assert here.parent == tmp_path / "kernels" and here.name.startswith("prunekit_cpu_kernels_")
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv2/lib/python3.11/site-packages/torch/__init__.py")
    monkeypatch.setattr("sys.prefix", "/elsewhere/venv2")
    assert kernels.build_dir() == here
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch never loads this build
    assert kernels.build_dir() != here


def test_the_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(kernels.ENV_CACHE, raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels.cache_root() == tmp_path / "xdg" / "prunekit" / "kernels"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_ext"))
    assert kernels.cache_root() == tmp_path / "torch_ext"
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / "mine"))
    assert kernels.cache_root() == tmp_path / "mine" / "kernels"


def test_a_first_build_says_so_on_stderr_with_the_expected_time(monkeypatch, capfd):
    with build_replaced_by(monkeypatch, None) as calls:
        assert kernels.cpu_kernels() is not None
        directory = kernels.build_dir()
    err = capfd.readouterr().err.strip().splitlines()
    assert len(calls) == 1 and calls[0]["name"] == directory.name
    assert len(err) == 2, err
    assert err[0].startswith("prunekit: compiling the optional CPU kernels once")
    assert kernels.EXPECTED_BUILD in err[0] and str(directory) in err[0]
    assert "python -m prunekit.kernels build" in err[0] and f"{kernels.ENV_SWITCH}=0" in err[0]
    assert err[1].startswith("prunekit: CPU kernels compiled in ")


def test_a_cached_build_is_loaded_without_compiling_or_a_notice(ext, monkeypatch, capfd, tmp_path):
    # another virtualenv built it: the same folder name under the shared cache is all it takes
    built = kernels.build_dir()
    with build_replaced_by(monkeypatch, AssertionError("compiled although the build was cached"),
                           cache=tmp_path) as calls:
        shutil.copytree(built, kernels.build_dir())
        module = kernels.cpu_kernels()
        assert module is not None and hasattr(module, "score_step_")
    assert not calls
    assert "compiling" not in capfd.readouterr().err


def test_the_build_command_prints_where_and_how_long(ext, capsys):
    from prunekit.kernels.__main__ import main

    assert main(["build"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"already built: {kernels.build_dir()}"
    assert main(["info"]) == 0
    assert capsys.readouterr().out.startswith(f"{kernels.build_dir()} (built;")


def test_the_build_command_reports_a_build_it_did_and_a_failure(monkeypatch, capsys):
    from prunekit.kernels.__main__ import main

    with build_replaced_by(monkeypatch, None):
        assert main(["build"]) == 0
        out = capsys.readouterr().out.strip()
        assert out.startswith("built in ") and out.endswith(f" s: {kernels.build_dir()}")
    with build_replaced_by(monkeypatch, RuntimeError("no C++ compiler found")):
        assert main(["build"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("prunekit: the CPU kernels did not build (RuntimeError: no C++ compiler found)")


def test_a_build_in_progress_elsewhere_is_waited_for_not_repeated(monkeypatch):
    import threading
    import types

    with build_replaced_by(monkeypatch, AssertionError("compiled twice")) as calls:
        directory = kernels.build_dir()
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = directory.with_name(directory.name + ".lock")
        lock.touch()  # another process is compiling

        def finish():  # ... and finishes: its library appears, its lock goes
            directory.mkdir()
            (directory / f"{directory.name}.so").touch()
            lock.unlink()

        monkeypatch.setattr(kernels, "_import", lambda d: types.ModuleType(d.name))
        timer = threading.Timer(0.5, finish)
        timer.start()
        try:
            module, where, seconds = kernels.build()
        finally:
            timer.join()
        assert not calls and where == directory and seconds == 0.0 and module.__name__ == directory.name


def test_a_lock_left_by_a_killed_build_is_taken_over(monkeypatch):
    import os

    with build_replaced_by(monkeypatch, None) as calls:
        directory = kernels.build_dir()
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = directory.with_name(directory.name + ".lock")
        lock.touch()
        old = lock.stat().st_mtime - kernels.STALE_LOCK_S - 60
        os.utime(lock, (old, old))
        assert kernels.cpu_kernels() is not None
        assert len(calls) == 1 and not lock.exists()
