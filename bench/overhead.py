"""Training-step overhead of pruning: pruned vs plain steps, interleaved, one thread.

BERT-mini shape (4 layers, hidden 256, 4 heads, intermediate 1024) BertForSequenceClassification, batch 16 x 128
tokens, 60 AdamW steps, pruning every 10 steps from 0 to 50, snip_momentum, global scope; patterns 1x1 @ 0.9,
4x1 @ 0.9, 2:4 @ 0.5. Prints JSON: per pattern the mean and median step-time ratio pruned/plain (with a 95 %
interval from the paired step differences) and the mean and max time of one mask update (pruning event).
Targets: mean ratio <= 1.01, one mask update <= 0.05 s.

Two model instances train side by side (the second a deep copy of the first). Repeats alternate which instance is
pruned (a crossover), so a speed difference between the instances themselves (memory placement) cancels out of the
pooled ratio. ``--control`` adds an A/A run: the same harness with no pruning, whose ratio shows the noise floor.

    python bench/overhead.py [--steps 60] [--patterns 1x1,4x1,2:4] [--repeats 4] [--control]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

import prunekit
import prunekit.kernels

TARGETS = {"1x1": 0.9, "4x1": 0.9, "2:4": 0.5}


def build_model(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def run(pattern: str, steps: int, batch: int, seq: int, swap: bool = False) -> dict:
    """One protocol of ``steps`` timed steps. ``pattern`` "none" prunes nothing (the A/A control); ``swap``
    prunes the original instance instead of its copy."""
    plain = build_model()
    pruned = copy.deepcopy(plain)
    if swap:
        plain, pruned = pruned, plain
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)
    opt_pruned = torch.optim.AdamW(pruned.parameters(), lr=1e-4, fused=True)
    config = {"target_sparsity": TARGETS.get(pattern), "pattern": pattern, "pruning_type": "snip_momentum",
              "pruning_scope": "global", "start_step": 0, "end_step": 50, "pruning_frequency": 10,
              "excluded_op_names": ["pooler", "classifier"], "pruning_op_types": ["Linear"]}
    # hooks registered around prunekit's own measure the time spent inside it (torch runs hooks in order)
    marks: dict[str, float] = {}
    hook_time = [0.0]

    def mark(name):
        def hook(*_):
            now = time.perf_counter()
            if name.endswith("_end"):
                hook_time[0] += now - marks[name[:-4]]
            else:
                marks[name] = now
        return hook

    opt_pruned.register_step_pre_hook(mark("pre"))
    opt_pruned.register_step_post_hook(mark("post"))
    pruning = prunekit.prepare_pruning(pruned, config, opt_pruned) if pattern != "none" else None
    opt_pruned.register_step_pre_hook(mark("pre_end"))
    opt_pruned.register_step_post_hook(mark("post_end"))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 30522, (batch, seq), generator=gen), torch.randint(0, 2, (batch,), generator=gen))
            for _ in range(4)]
    times = {"plain": [], "pruned": []}

    def step(model, opt, ids, labels):
        began = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    hook_per_step = []
    for i in range(steps + 2):  # two warm-up steps each, not timed
        ids, labels = data[i % len(data)]
        order = [("plain", plain, opt_plain), ("pruned", pruned, opt_pruned)]
        if i % 2:
            order.reverse()  # alternate who goes first, so drift hits both equally
        for name, model, opt in order:
            before = hook_time[0]
            elapsed = step(model, opt, ids, labels)
            if i >= 2:
                times[name].append(elapsed)
                if name == "pruned":
                    hook_per_step.append(hook_time[0] - before)
    events = [e.seconds for e in pruning.pruners[0].history if e.target > 0] if pruning else []
    ratios = [p / q for p, q in zip(times["pruned"], times["plain"])]
    return {
        "pattern": pattern,
        "target": TARGETS.get(pattern, 0.0),
        "final_sparsity": round(pruning.current_sparsity(), 4) if pruning else 0.0,
        "plain_mean_s": statistics.mean(times["plain"]),
        "pruned_mean_s": statistics.mean(times["pruned"]),
        "mean_ratio": statistics.mean(times["pruned"]) / statistics.mean(times["plain"]),
        "pruned_instance": "original" if swap else "copy",
        # the time spent inside prunekit's hooks (events included), over the plain step: the overhead without
        # the noise of timing two different steps
        "hook_mean_s": statistics.mean(hook_per_step),
        "hook_fraction": statistics.mean(hook_per_step) / statistics.mean(times["plain"]),
        # a step without an event (the median step): the steady per-step cost
        "hook_median_s": statistics.median(hook_per_step),
        "median_ratio": statistics.median(ratios),
        "mask_update_mean_s": statistics.mean(events) if events else None,
        "mask_update_max_s": max(events) if events else None,
        "events": len(events),
        "_times": times,
        "_hooks": hook_per_step,
        "_events": events,
    }


def ratio_interval(plain: list[float], pruned: list[float]) -> list[float]:
    """95 % interval of mean(pruned)/mean(plain) from the paired differences (each pruned step was timed right
    beside its plain step, so drift of the machine cancels within a pair)."""
    diffs = [p - q for p, q in zip(pruned, plain)]
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5
    base = statistics.mean(plain)
    mid = 1 + statistics.mean(diffs) / base
    return [round(mid - half / base, 4), round(mid + half / base, 4)]


def pooled(runs: list[dict]) -> dict:
    """One pattern's repeats pooled: the same statistics over every timed step of every repeat."""
    plain = [t for r in runs for t in r["_times"]["plain"]]
    pruned = [t for r in runs for t in r["_times"]["pruned"]]
    hooks = [h for r in runs for h in r["_hooks"]]
    events = [e for r in runs for e in r["_events"]]
    ratios = [p / q for p, q in zip(pruned, plain)]
    out = {k: v for k, v in runs[-1].items() if not k.startswith("_")}
    out.update({
        "repeats": len(runs),
        "plain_mean_s": statistics.mean(plain),
        "pruned_mean_s": statistics.mean(pruned),
        "mean_ratio": statistics.mean(pruned) / statistics.mean(plain),
        "mean_ratio_ci95": ratio_interval(plain, pruned),
        "pruned_instance_per_repeat": [r["pruned_instance"] for r in runs],
        "mean_ratio_per_repeat": [
            round(statistics.mean(r["_times"]["pruned"]) / statistics.mean(r["_times"]["plain"]), 4) for r in runs],
        "hook_mean_s": statistics.mean(hooks),
        "hook_fraction": statistics.mean(hooks) / statistics.mean(plain),
        "hook_median_s": statistics.median(hooks),
        "median_ratio": statistics.median(ratios),
        "mask_update_mean_s": statistics.mean(events) if events else None,
        "mask_update_max_s": max(events) if events else None,
        "events": len(events),
    })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--patterns", default="1x1,4x1,2:4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4,
                        help="run each pattern's protocol this many times, alternating which instance is pruned, "
                             "and pool the steps (a shared machine's noise of a few percent averages out)")
    parser.add_argument("--control", action="store_true",
                        help="also run the harness with no pruning (pattern 'none'): the A/A noise floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patterns = args.patterns.split(",") + (["none"] if args.control else [])
    results = [pooled([run(p, args.steps, args.batch, args.seq, swap=bool(k % 2)) for k in range(args.repeats)])
               for p in patterns]
    print(json.dumps({"bench": "overhead", "torch": torch.__version__, "threads": args.threads,
                      "machine": platform.processor() or platform.machine(),
                      "cpu_kernels": prunekit.kernels.cpu_kernels() is not None, "results": results}, indent=2))


if __name__ == "__main__":
    main()
