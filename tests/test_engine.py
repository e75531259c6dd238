"""The engine end to end: scopes, per-op bounds, criteria, step timing, optimizer interplay, AMP, pickling,
selection rules, multi-pruner configs and a tiny BERT through both driving styles."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import prunekit
from conftest import MLP, batch, full_mask, masks_of, train_step
from prunekit.errors import SelectionError

LAYERS = ("fc1", "fc2", "fc3")


# ---- helpers ------------------------------------------------------------------------------------------
def blocks4x1(t: torch.Tensor) -> torch.Tensor:
    """Mean over 4x1 blocks of a Linear-shaped tensor: [out // 4, in], block (i, j) = rows 4i..4i+3 of col j."""
    return t.reshape(t.shape[0] // 4, 4, t.shape[1]).mean(dim=1)


def block_pruned(layer) -> torch.Tensor:
    """[out // 4, in] bool: which 4x1 blocks of ``layer`` its mask prunes."""
    return ~full_mask(layer).reshape(layer.weight.shape[0] // 4, 4, -1).all(dim=1)


def unit_counts(pruning) -> dict[str, tuple[int, int]]:
    return {l.name: (l.bound.pruned_units(l.mask), l.num_units) for l in pruning.layers}


def assert_global_lowest(pruned: list[torch.Tensor], scores: list[torch.Tensor]) -> None:
    """Across layers, no pruned unit outscores a kept one (a global ranking with no cap/floor active)."""
    p, s = torch.cat([x.reshape(-1) for x in pruned]), torch.cat([x.reshape(-1) for x in scores])
    assert s[p].max() <= s[~p].min() * (1 + 1e-5)


def run(model, cfg, steps, optimizer=None, callbacks=False, **batch_kw):
    """Train ``model`` for ``steps`` optimizer steps with prepare_pruning (or the explicit callbacks)."""
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if callbacks:  # no optimizer given: the callbacks do the work (given one, Pruning hooks into it)
        pruning = prunekit.Pruning(model, cfg)
        pruning.on_train_begin()
        for step in range(steps):
            pruning.on_step_begin(step)
            x, y = batch(step, **batch_kw)
            nn.functional.cross_entropy(model(x), y).backward()
            pruning.on_before_optimizer_step()
            opt.step()
            pruning.on_after_optimizer_step()
            pruning.on_step_end()
            opt.zero_grad()
    else:
        pruning = prunekit.prepare_pruning(model, cfg, opt)
        for step in range(steps):
            train_step(model, opt, step, **batch_kw)
    return pruning, opt


ITER = {"start_step": 1, "end_step": 7, "pruning_frequency": 2}


# ---- scope and per-op bounds ----------------------------------------------------------------------------
def scaled_mlp(fc1_scale: float) -> MLP:
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.mul_(fc1_scale)
    return model


def test_local_scope_puts_every_layer_at_the_target():
    model = scaled_mlp(4.0)
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.6,
                                       "pruning_scope": "local"})
    pruning.on_train_begin()
    for name, (pruned, n) in unit_counts(pruning).items():
        assert pruned == round(0.6 * n), name
        assert int((getattr(model, name).weight == 0).sum()) == 4 * pruned


def test_global_scope_differs_per_layer_but_hits_the_total():
    model = scaled_mlp(4.0)  # fc1's weights are 4x larger: a global ranking spares it
    before = {n: getattr(model, n).weight.detach().clone() for n in LAYERS}
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.6})
    pruning.on_train_begin()
    counts = unit_counts(pruning)
    ratios = {n: p / u for n, (p, u) in counts.items()}
    assert ratios["fc1"] < 0.3 < 0.6 < min(ratios["fc2"], ratios["fc3"])
    total = sum(u for _, u in counts.values())
    assert sum(p for p, _ in counts.values()) == round(0.6 * total)
    layers = pruning.layers
    assert_global_lowest([block_pruned(l) for l in layers], [blocks4x1(before[l.name].abs()) for l in layers])
    assert pruning.current_sparsity() == pytest.approx(0.6, abs=1 / total)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_max_per_op_caps_each_layer_and_total_still_reached(scope):
    model = scaled_mlp(0.05)  # fc1 tiny: an uncapped global ranking would prune nearly all of it
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.6,
                                       "max_sparsity_ratio_per_op": 0.7, "pruning_scope": scope})
    pruning.on_train_begin()
    counts = unit_counts(pruning)
    for name, (p, n) in counts.items():
        assert p <= round(0.7 * n), name
    if scope == "local":  # each layer at the target (below the cap)
        assert all(p == round(0.6 * n) for p, n in counts.values())
    else:  # fc1 held at its cap, the others make up the difference
        assert counts["fc1"][0] == round(0.7 * counts["fc1"][1])
        total = sum(u for _, u in counts.values())
        assert sum(p for p, _ in counts.values()) == round(0.6 * total)


def test_min_per_op_floors_each_layer_and_total_still_reached():
    model = scaled_mlp(20.0)  # fc1 huge: an unfloored global ranking would leave it dense
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.6,
                                       "min_sparsity_ratio_per_op": 0.5})
    pruning.on_train_begin()
    counts = unit_counts(pruning)
    assert counts["fc1"][0] == round(0.5 * counts["fc1"][1])
    total = sum(u for _, u in counts.values())
    assert sum(p for p, _ in counts.values()) == round(0.6 * total)


def test_min_and_max_per_op_hold_at_the_end_of_iterative_training():
    model = scaled_mlp(8.0)
    pruning, _ = run(model, {"target_sparsity": 0.6, "min_sparsity_ratio_per_op": 0.5,
                             "max_sparsity_ratio_per_op": 0.7, "start_step": 0, "end_step": 8,
                             "pruning_frequency": 2}, 10)
    counts = unit_counts(pruning)
    for name, (p, n) in counts.items():
        assert round(0.5 * n) <= p <= round(0.7 * n), (name, p / n)
    total = sum(u for _, u in counts.values())
    assert sum(p for p, _ in counts.values()) == round(0.6 * total)


# ---- criteria -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["magnitude", "gradient", "snip", "snip_momentum"])
@pytest.mark.parametrize("pattern", ["4x1", "2:4"])
def test_every_criterion_reaches_the_target(criterion, pattern):
    model = MLP()
    target = 0.7 if pattern == "4x1" else 0.5
    pruning, _ = run(model, {"pruning_type": criterion, "pattern": pattern, "target_sparsity": target, **ITER}, 10)
    assert [e.step for e in pruning.pruners[0].history] == [1, 3, 5, 7]
    units = sum(n for _, n in unit_counts(pruning).values())
    pruned = sum(p for p, _ in unit_counts(pruning).values())
    unit_target = target / (0.5 if ":" in pattern else 1)  # 2:4 at 0.5 = every group
    assert abs(pruned - unit_target * units) <= 0.5
    assert pruning.current_sparsity() == pytest.approx(target, abs=2 / units)
    for layer in pruning.layers:
        assert bool((layer.weight[~full_mask(layer)] == 0).all())


@pytest.mark.parametrize("criterion", ["gradient", "snip", "snip_momentum"])
def test_gradient_criteria_scores_follow_their_formulas(criterion):
    """Scores see each optimizer step's raw gradient before an event (snip_momentum: 0.9·S + |W·G|)."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        {n: (getattr(model, n).weight.detach().clone(), getattr(model, n).weight.grad.clone()) for n in LAYERS}))
    pruning = prunekit.prepare_pruning(model, {"pruning_type": criterion, "start_step": 4, "end_step": 4}, opt)
    for step in range(4):
        train_step(model, opt, step)
    crit = pruning.pruners[0].criterion
    for name in LAYERS:
        expected = torch.zeros_like(blocks4x1(seen[0][name][0]))
        for snapshot in (seen if criterion == "snip_momentum" else seen[-1:]):
            w, g = snapshot[name]
            term = blocks4x1((g if criterion == "gradient" else w * g).abs())
            expected = 0.9 * expected + term
        layer = next(l for l in pruning.layers if l.name == name)
        got = crit.layer_scores(layer)
        assert torch.allclose(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-9), name


@pytest.mark.parametrize("pattern,reduce", [("4x1", "mean"), ("1xchannel", "mean"), ("4x1", "sum"),
                                            ("channelx1", "max")])
def test_block_scores_read_back_with_the_configured_reduction(pattern, reduce):
    """Block means are accumulated as sums and divided at read time: what a criterion hands to the ranking is
    the configured reduction of |W| over each block (channels of different lengths must compare as means)."""
    model = MLP(sizes=(16, 32, 8, 32, 4))  # fc2 and fc3 have rows of different lengths
    pruning = prunekit.Pruning(model, {"pattern": pattern, "pruning_type": "magnitude",
                                       "criterion_reduce_type": reduce, "start_step": 5, "end_step": 5})
    crit = pruning.pruners[0].criterion
    for layer in pruning.layers:
        w = layer.weight.detach().abs()
        out, inn = w.shape
        rows, cols = {"4x1": (4, 1), "1xchannel": (1, inn), "channelx1": (out, 1)}[pattern]
        blocks = w.reshape(out // rows, rows, inn // cols, cols)
        expected = {"mean": blocks.mean(dim=(1, 3)), "sum": blocks.sum(dim=(1, 3)),
                    "max": blocks.amax(dim=(1, 3))}[reduce]
        got = crit.layer_scores(layer).reshape(expected.shape)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), layer.name


@pytest.mark.parametrize("criterion,horizon", [("snip", 1), ("snip_momentum", 132)])
def test_gradients_too_early_or_after_the_last_event_are_not_scored(criterion, horizon):
    """Scores are only read at events: a latest-step criterion needs only the step before an event, a momentum
    criterion the ~132 steps whose weight is above 1e-6; steps after the last event are never scored."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = horizon + 3
    pruning = prunekit.prepare_pruning(model, {"pruning_type": criterion, "start_step": start,
                                               "end_step": start}, opt)
    crit = pruning.pruners[0].criterion
    for step in range(start - horizon):  # every step here is more than `horizon` steps before the event
        train_step(model, opt, step)
    assert crit.scores == {}
    train_step(model, opt, start - horizon)
    assert set(crit.scores) == set(LAYERS)
    for step in range(start - horizon + 1, start + 1):
        train_step(model, opt, step)
    frozen = {n: t.clone() for n, t in crit.scores.items()}
    train_step(model, opt, start + 1)  # after the last event
    assert all(torch.equal(frozen[n], crit.scores[n]) for n in LAYERS)


# ---- the default config and step-0 one-shot with a gradient criterion --------------------------------------
@pytest.mark.parametrize("callbacks", [False, True])
def test_default_config_prunes_at_step_0_from_the_first_gradients_before_the_update(callbacks):
    """The original's default (snip_momentum, start = end = 0) crashed; ours prunes once, at step 0, from the
    step-0 gradients, before optimizer.step() consumes them."""
    model = MLP()
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    captured, at_step = {}, {}

    def capture(o, a, k):  # registered before prunekit's hook: sees the raw step-0 weights and gradients
        captured.setdefault("wg", {n: (getattr(model, n).weight.detach().clone(),
                                       getattr(model, n).weight.grad.clone()) for n in LAYERS})
    opt.register_step_pre_hook(capture)
    if callbacks:
        pruning = prunekit.Pruning(model, {})
        pruning.on_train_begin()
    else:
        pruning = prunekit.prepare_pruning(model, {}, opt)
    assert pruning.current_sparsity() == 0.0  # no gradient yet: nothing can be ranked before the first step

    def check(o, a, k):  # runs after prunekit's own pre-hook: masks set, gradients masked
        at_step["sparsity"] = pruning.current_sparsity()
        at_step["grads"] = all(bool((l.weight.grad[~full_mask(l)] == 0).all()) for l in pruning.layers)
    opt.register_step_pre_hook(check)

    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    if callbacks:
        pruning.on_step_begin()
        pruning.on_before_optimizer_step()
        check(opt, (), {})
        opt.step()
        pruning.on_after_optimizer_step()
    else:
        opt.step()
    assert at_step["sparsity"] == pytest.approx(0.9, abs=0.005) and at_step["grads"]
    assert pruning.global_step == 1
    assert [e.step for e in pruning.pruners[0].history] == [0]
    # the choice is the globally lowest 4x1 blocks of |W·G| at step 0 (pre-update weights)
    layers = pruning.layers
    scores = [blocks4x1((captured["wg"][l.name][0] * captured["wg"][l.name][1]).abs()) for l in layers]
    k = round(0.9 * sum(s.numel() for s in scores))
    flat = torch.cat([s.reshape(-1) for s in scores])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.argsort(flat, stable=True)[:k]] = True
    sizes = [s.numel() for s in scores]
    for l, c, s in zip(layers, chosen.split(sizes), scores):
        assert int(c.sum()) <= round(0.98 * s.numel()), "the per-op cap would interfere; pick another seed"
        assert torch.equal(block_pruned(l).reshape(-1), c), l.name
        w0, g0 = captured["wg"][l.name]
        keep = full_mask(l)
        assert torch.allclose(l.weight[keep], (w0 - lr * g0)[keep], atol=1e-7)  # kept: a plain SGD update
        assert bool((l.weight[~keep] == 0).all())
    for step in range(1, 4):  # nothing more happens: one-shot
        before = masks_of(pruning)
        if not callbacks:
            train_step(model, opt, step)
        else:
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            pruning.on_before_optimizer_step()
            opt.step()
            pruning.on_after_optimizer_step()
            opt.zero_grad()
        assert all(torch.equal(before[n], m) for n, m in masks_of(pruning).items())
    assert len(pruning.pruners[0].history) == 1


# ---- optimizer interplay --------------------------------------------------------------------------------
class Drift(torch.optim.Optimizer):
    """Heavy-ball SGD that also moves every weight by a constant (not zero-preserving, so prunekit must re-mask
    after each step). It implements step() itself: see the subclass test below for why that matters."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"]).add_(1e-3)


MOMENTS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "grad_avg", "square_avg", "sum"}

OPTIMIZERS = {
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01, amsgrad=True),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    "rmsprop_centered_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True,
                                                               weight_decay=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, lr_decay=0.01, weight_decay=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.01),
    "radam_decoupled": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.01),
    "drift_custom": lambda p: Drift(p, lr=0.05),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_masks_survive_weight_decay_and_momentum(opt_name):
    model = MLP()
    opt = OPTIMIZERS[opt_name](model.parameters())
    pruning = prunekit.prepare_pruning(model, {"target_sparsity": 0.8, "start_step": 2, "end_step": 8,
                                               "pruning_frequency": 2}, opt)
    problems: list[str] = []
    steps_seen = []

    def pre(o, a, k):
        for l in pruning.layers:
            if not bool((l.weight.grad[~full_mask(l)] == 0).all()):
                problems.append(f"step {pruning.global_step}: {l.name} grad of a pruned weight is non-zero")

    def post(o, a, k):
        steps_seen.append(pruning.global_step)
        for l in pruning.layers:
            dead = ~full_mask(l)
            if not bool((l.weight[dead] == 0).all()):
                problems.append(f"step {pruning.global_step}: {l.name} pruned weight regrew")
            for key, value in o.state[l.weight].items():
                # momentum-like state must be 0 behind pruned weights (Adamax's exp_inf is eps there: harmless)
                if key in MOMENTS and value.shape == l.weight.shape:
                    if not bool((value[dead] == 0).all()):
                        problems.append(f"step {pruning.global_step}: {l.name} {key} of a pruned weight != 0")

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    for step in range(12):
        train_step(model, opt, step)
    assert not problems, problems[:5]
    assert steps_seen == list(range(1, 13))
    assert pruning.current_sparsity() == pytest.approx(0.8, abs=0.005)
    state_keys = {k for l in pruning.layers for k in opt.state[l.weight]}
    assert state_keys & {"exp_avg", "momentum_buffer", "sum", "square_avg"}, "no optimizer state was checked"


class SubclassedAdamW(torch.optim.AdamW):
    """A user optimizer that customises step() and calls super().step() (a common pattern)."""

    def step(self, closure=None):
        return super().step(closure)


def test_optimizer_subclass_calling_super_step_counts_each_step_once():
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # as any earlier AdamW in the process would
    model = MLP()
    opt = SubclassedAdamW(model.parameters(), lr=1e-2)
    pruning = prunekit.prepare_pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.5,
                                               "start_step": 4, "end_step": 4}, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            train_step(model, opt, step)
    assert pruning.global_step == 3
    assert pruning.current_sparsity() == 0.0, "the step-4 event ran early"


def test_event_zeroes_adam_moments_of_newly_pruned_weights():
    """After an event in the middle of training (moments already non-zero), the pruned moments are 0."""
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruning = prunekit.prepare_pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.5,
                                               "start_step": 3, "end_step": 3}, opt)
    for step in range(2):
        train_step(model, opt, step)
    moments = {l.name: opt.state[l.weight]["exp_avg"].clone() for l in pruning.layers}
    train_step(model, opt, 2)  # its post-hook runs the event due at step 3
    assert pruning.global_step == 3 and pruning.current_sparsity() == pytest.approx(0.5)
    for l in pruning.layers:
        dead = ~full_mask(l)
        assert (moments[l.name][dead] != 0).float().mean() > 0.5, "the test needs live moments to zero"
        for key in ("exp_avg", "exp_avg_sq"):
            assert bool((opt.state[l.weight][key][dead] == 0).all()), (l.name, key)


def test_evaluation_and_extra_forwards_never_advance_the_step():
    model = MLP()
    pruning, opt = run(model, {"target_sparsity": 0.5, "start_step": 1, "end_step": 5, "pruning_frequency": 1}, 3)
    assert pruning.global_step == 3
    masks, history = masks_of(pruning), list(pruning.pruners[0].history)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        for step in range(20):
            model(batch(step)[0])
    model.train()
    for step in range(5):
        model(batch(step)[0]).sum()  # forwards of a train-mode model that never steps
    assert pruning.global_step == 3
    assert all(torch.equal(masks[n], m) for n, m in masks_of(pruning).items())
    assert pruning.pruners[0].history == history
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("callbacks", [False, True])
def test_gradient_accumulation_counts_optimizer_steps(callbacks):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = {"pruning_type": "magnitude", "target_sparsity": 0.5, "start_step": 2, "end_step": 6,
           "pruning_frequency": 2, "sparsity_decay_type": "linear"}
    pruning = prunekit.Pruning(model, cfg) if callbacks else prunekit.prepare_pruning(model, cfg, opt)
    if callbacks:
        pruning.on_train_begin()
    after_step = []
    for step in range(8):
        for micro in range(4):
            if callbacks:
                pruning.on_step_begin(step * 4 + micro)  # called per micro-batch: must not count
            x, y = batch(step * 4 + micro, size=4)
            (nn.functional.cross_entropy(model(x), y) / 4).backward()
        assert pruning.global_step == step
        if callbacks:
            pruning.on_before_optimizer_step()
        opt.step()
        if callbacks:
            pruning.on_after_optimizer_step()
        opt.zero_grad()
        after_step.append(pruning.current_sparsity())
    assert pruning.global_step == 8
    assert [e.step for e in pruning.pruners[0].history] == [2, 4, 6]
    # events at the start of optimizer steps 4 and 6 (step 2 targets the initial sparsity)
    assert after_step[:3] == [0.0, 0.0, 0.0]
    assert after_step[3] == after_step[4] == pytest.approx(0.25, abs=0.005)
    assert after_step[5:] == [pytest.approx(0.5, abs=0.005)] * 3


def test_amp_grad_scaler_hooks_see_unscaled_gradients():
    """GradScaler.step unscales before optimizer.step, so prepare_pruning's hooks see true gradients: a
    scaled run (power-of-two scale, exact in float) must match a plain run bit for bit."""
    try:
        probe = torch.amp.GradScaler("cpu")
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"GradScaler('cpu') unavailable: {exc}")
    if not probe.is_enabled():  # pragma: no cover
        pytest.skip("GradScaler('cpu') is disabled in this torch build")
    cfg = {"target_sparsity": 0.5, "start_step": 2, "end_step": 6, "pruning_frequency": 2}
    results = {}
    for mode in ("plain", "scaler_hooks", "scaler_callbacks"):
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
        if mode == "scaler_callbacks":
            pruning = prunekit.Pruning(model, cfg)
            pruning.on_train_begin()
        else:
            pruning = prunekit.prepare_pruning(model, cfg, opt)
        for step in range(9):
            x, y = batch(step)
            loss = nn.functional.cross_entropy(model(x), y)
            if mode == "plain":
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                if mode == "scaler_callbacks":
                    scaler.unscale_(opt)
                    pruning.on_before_optimizer_step()
                scaler.step(opt)
                if mode == "scaler_callbacks":
                    pruning.on_after_optimizer_step()
                scaler.update()
                assert scaler.get_scale() > 1.0
            opt.zero_grad()
        results[mode] = (pruning.pruners[0].criterion.scores, masks_of(pruning),
                         {n: p.detach().clone() for n, p in model.named_parameters()})
    for mode in ("scaler_hooks", "scaler_callbacks"):
        for a, b in zip(results["plain"], results[mode]):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (mode, key)


def test_amp_step_skipped_by_the_scaler_is_not_counted_or_scored():
    """An inf gradient makes GradScaler skip optimizer.step(): no step, no score update, no event."""
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"GradScaler('cpu') unavailable: {exc}")
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruning = prunekit.prepare_pruning(model, {"target_sparsity": 0.5, "start_step": 3, "end_step": 3}, opt)
    for step in range(4):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 2:
            scores = {k: v.clone() for k, v in pruning.pruners[0].criterion.scores.items()}
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 2:
            assert pruning.global_step == 2
            assert all(torch.equal(v, pruning.pruners[0].criterion.scores[k]) for k, v in scores.items())
            assert pruning.current_sparsity() == 0.0
    assert pruning.global_step == 3
    assert pruning.current_sparsity() == pytest.approx(0.5, abs=0.005)  # the step-3 event, after 3 real steps


# ---- the model object stays an ordinary module ----------------------------------------------------------
def test_whole_model_save_and_deepcopy_after_prepare_pruning():
    model = MLP()
    pruning, opt = run(model, {"target_sparsity": 0.5, "start_step": 1, "end_step": 3}, 4)
    x = batch(99)[0]
    ref = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone):
        assert torch.equal(other(x), ref)
        for l in pruning.layers:
            sub = other.get_submodule(l.name)
            assert torch.equal(sub.weight_prune_mask, l.mask)
            assert torch.equal(sub.weight, l.weight)
    train_step(model, opt, 4)  # the original keeps training after the copies were made
    assert pruning.global_step == 5


def test_state_dict_keys_unchanged_and_loads_strictly_into_a_fresh_model():
    model = MLP()
    fresh = MLP(seed=7)
    keys = list(fresh.state_dict().keys())
    pruning, _ = run(model, {"target_sparsity": 0.5, "start_step": 1, "end_step": 3}, 4)
    assert list(model.state_dict().keys()) == keys
    result = fresh.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = batch(3)[0]
    assert torch.equal(fresh(x), model(x))
    assert int((fresh.fc2.weight == 0).sum()) >= pruning.layers[1].zeros() > 0


# ---- selection ------------------------------------------------------------------------------------------
def test_selection_matching_nothing_lists_the_candidates():
    model = MLP()
    with pytest.raises(SelectionError) as info:
        prunekit.Pruning(model, {"op_names": ["encoder\\.layer"]})
    message = str(info.value)
    for name in ("fc1", "fc2", "fc3", "encoder\\\\.layer"):
        assert name in message, message
    with pytest.raises(SelectionError, match="none|fc1"):
        prunekit.Pruning(model, {"pruning_op_types": ["Conv"]})


def test_output_head_is_not_pruned_unless_named():
    model = MLP()
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.5})
    assert [l.name for l in pruning.layers] == list(LAYERS)
    assert not hasattr(model.out, "weight_prune_mask")
    pruning.on_train_begin()
    assert int((model.out.weight == 0).sum()) == 0
    model = MLP()
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "target_sparsity": 0.5, "op_names": ["out"]})
    assert [l.name for l in pruning.layers] == ["out"]


class FcHead(nn.Module):
    """The head is called ``fc``: the original excluded it with a regex *search*, dropping fc1/fc2 too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 4)


def test_head_exclusion_is_exact_not_a_regex_search():
    model = FcHead()
    pruning = prunekit.Pruning(model, {"pruning_type": "magnitude", "pattern": "1x1"})
    assert [l.name for l in pruning.layers] == ["fc1", "fc2"]


def test_two_pruners_on_the_same_layer_is_an_error():
    model = MLP()
    cfg = {"pruning_configs": [{"op_names": ["fc1", "fc2"]}, {"op_names": ["fc2$", "fc3"]}]}
    with pytest.raises(SelectionError, match="fc2"):
        prunekit.Pruning(model, cfg)


def test_v2_config_with_mixed_local_patterns():
    """One pruner 2:4 at 0.5 on fc1/fc2, another 4x1 at 0.8 on fc3: each set gets its own pattern."""
    model = MLP()
    cfg = {"pruning_configs": [{"op_names": ["fc1", "fc2"], "pattern": "2:4", "target_sparsity": 0.5},
                               {"op_names": ["fc3"], "pattern": "4x1", "target_sparsity": 0.8}],
           "pruning_type": "snip_momentum", "start_step": 1, "end_step": 5, "pruning_frequency": 2,
           "pruning_scope": "local"}
    pruning, _ = run(model, cfg, 8)
    assert [[l.name for l in p.layers] for p in pruning.pruners] == [["fc1", "fc2"], ["fc3"]]
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(dim=2)
        assert bool((zeros == 2).all()), name
    w = model.fc3.weight
    blocks = (w == 0).reshape(8, 4, 32)
    assert bool((blocks.all(dim=1) | (~blocks).all(dim=1)).all())
    assert int(blocks.all(dim=1).sum()) == round(0.8 * 256)
    report = prunekit.sparsity_report(model, pruning)
    assert {r.name: r.pattern for r in report.layers} == {"fc1": "2:4", "fc2": "2:4", "fc3": "4x1"}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_callbacks_and_optimizer_hooks_give_identical_runs(optimizer):
    cfg = {"target_sparsity": 0.7, "pattern": "4x1", **ITER}
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05),
            "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)}[optimizer]
    a, b = MLP(), MLP()
    pa, _ = run(a, cfg, 9, optimizer=make(a.parameters()))
    pb, _ = run(b, cfg, 9, optimizer=make(b.parameters()), callbacks=True)
    for (na, ta), (nb, tb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(ta, tb), na
    assert all(torch.equal(m, masks_of(pb)[n]) for n, m in masks_of(pa).items())
    assert pa.global_step == pb.global_step == 9


def test_callbacks_on_a_hooked_pruning_do_not_count_twice():
    """Given an optimizer, Pruning hooks into it; calling the step callbacks as well must be harmless."""
    cfg = {"target_sparsity": 0.7, "pattern": "4x1", **ITER}
    a, b = MLP(), MLP()
    pa, _ = run(a, cfg, 9)
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    pb = prunekit.Pruning(b, cfg, opt)
    pb.on_train_begin()
    for step in range(9):
        pb.on_step_begin(step)
        x, y = batch(step)
        nn.functional.cross_entropy(b(x), y).backward()
        pb.on_before_optimizer_step()
        opt.step()
        pb.on_after_optimizer_step()
        pb.on_step_end()
        opt.zero_grad(set_to_none=True)
    assert pb.global_step == 9
    assert [e.step for e in pb.pruners[0].history] == [1, 3, 5, 7]
    for (na, ta), (_, tb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(ta, tb), na


# ---- a tiny BERT ----------------------------------------------------------------------------------------
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def bert_batch(step: int):
    gen = torch.Generator().manual_seed(5000 + step)
    ids = torch.randint(0, 100, (8, 12), generator=gen)
    labels = (ids[:, 0] % 2).long()  # learnable from the first token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("pattern, target", [("4x1", 0.8), ("2:4", 0.5)])
@pytest.mark.parametrize("callbacks", [False, True], ids=["prepare_pruning", "callbacks"])
def test_tiny_bert_reaches_target_and_keeps_classifier_dense(pattern, target, callbacks):
    model = tiny_bert()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    cfg = {"pattern": pattern, "target_sparsity": target, "start_step": 2, "end_step": 20,
           "pruning_frequency": 3}
    if callbacks:
        pruning = prunekit.Pruning(model, cfg)
        pruning.on_train_begin()
    else:
        pruning = prunekit.prepare_pruning(model, cfg, opt)
    for step in range(24):
        if callbacks:
            pruning.on_step_begin(step)
        loss = model(**bert_batch(step)).loss
        loss.backward()
        if callbacks:
            pruning.on_before_optimizer_step()
        opt.step()
        if callbacks:
            pruning.on_after_optimizer_step()
            pruning.on_step_end()
        opt.zero_grad()
        assert torch.isfinite(loss)
    report = pruning.on_train_end(print_report=False)
    names = [l.name for l in pruning.layers]
    assert "classifier" not in names and not any("embeddings" in n for n in names)
    assert "bert.encoder.layer.0.attention.self.query" in names and "bert.pooler.dense" in names
    assert len(names) == 2 * 6 + 1
    assert not hasattr(model.classifier, "weight_prune_mask")
    assert int((model.classifier.weight == 0).sum()) == 0
    assert report.pruned_layers_sparsity == pytest.approx(target, abs=0.003)
    assert pruning.global_step == 24
    for l in pruning.layers:
        w = l.weight.detach()
        if pattern == "2:4":  # global 2:4 at 0.5: every group of 4 consecutive inputs has exactly 2 zeros
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(dim=2) == 2).all()), l.name
        else:
            blocks = (w == 0).reshape(w.shape[0] // 4, 4, -1)
            assert bool((blocks.all(dim=1) | (~blocks).all(dim=1)).all()), l.name


# ---- pre-sparsified models, low-memory scores, failed construction ------------------------------------------
def half_zero_fc2() -> MLP:
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[:, ::2] = 0  # 512 of fc2's 1024 weights
    return model


def test_pattern_lock_keeps_existing_zeros_and_prunes_nothing_new():
    model = half_zero_fc2()
    pruning, _ = run(model, {"pruning_type": "pattern_lock", "pattern": "1x1"}, 6)
    assert bool((model.fc2.weight[:, ::2] == 0).all())
    assert int((model.fc2.weight[:, 1::2] == 0).sum()) == 0
    assert int((model.fc1.weight == 0).sum()) == int((model.fc3.weight == 0).sum()) == 0
    assert pruning.current_sparsity() == pytest.approx(512 / 2560)


def test_lock_init_sparsity_global_starts_from_the_existing_zeros():
    model = half_zero_fc2()
    cfg = {"pruning_type": "magnitude", "pattern": "1x1", "lock_init_sparsity": True, "target_sparsity": 0.6,
           "start_step": 0, "end_step": 4}
    pruning, _ = run(model, cfg, 6)
    history = pruning.pruners[0].history
    assert history[0].target == pytest.approx(0.2) and history[-1].target == 0.6
    assert bool((model.fc2.weight[:, ::2] == 0).all())
    assert pruning.current_sparsity() == pytest.approx(0.6, abs=1 / 2560)


def test_lock_init_sparsity_local_start_event_keeps_the_locked_zeros():
    model = half_zero_fc2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruning = prunekit.prepare_pruning(model, {"pruning_type": "magnitude", "pattern": "1x1",
                                               "lock_init_sparsity": True, "target_sparsity": 0.6,
                                               "start_step": 0, "end_step": 4, "pruning_scope": "local"}, opt)
    fc1, fc2, fc3 = pruning.layers
    keep = fc2.bound.expand(fc2.mask)  # the mask at weight shape
    assert bool((~keep)[:, ::2].all()), "the locked zeros of fc2 must stay masked at the start event"
    assert bool(keep[:, 1::2].all()), "and nothing else of fc2 is pruned by the start event"
    assert fc1.zeros() == fc3.zeros() == 0, "the start event targets the initial sparsity: a no-op"


def test_low_memory_scores_reach_the_target():
    model = MLP()
    pruning, _ = run(model, {"target_sparsity": 0.7, "low_memory_usage": True, **ITER}, 9)
    assert all(s.dtype == torch.bfloat16 for s in pruning.pruners[0].criterion.scores.values())
    assert pruning.current_sparsity() == pytest.approx(0.7, abs=0.005)


def test_rejected_overlapping_pruners_leave_the_model_untouched():
    model = MLP()
    with pytest.raises(SelectionError):
        prunekit.Pruning(model, {"pruning_configs": [{"op_names": ["fc1", "fc2"]}, {"op_names": ["fc2$"]}]})
    assert not [n for n, _ in model.named_buffers()]
    assert prunekit.sparsity_report(model).layers == []
