"""Structured one-shot pruning of SmolLM2-135M: perplexity, recovery and measured CPU speed-up side by side.

One calibration pass (prunekit.oneshot.structured.importance.collect_stats) serves every point. For each cut
(FFN sparsity and/or head sparsity, 10-40 % fewer decoder parameters) and each importance method (flap with its
bias fold, wanda-sp, the weight-norm baseline; all at the same widths): held-out perplexity after one-shot; after
recovery by ``prunekit distill`` with a fixed token budget when that command exists (else the column is empty
and the JSON says why); and, once per width, the decoder stack's latency (batch 1 x 512 tokens, torch threads =
2, dense and pruned runs alternating, median) against the FLOP-ideal speed-up (decoder weights + attention
scores, prunekit.oneshot.structured.flops). Prints one JSON object; writes bench/structured.png.

    python bench/structured.py                                       # the full protocol (slow on a shared CPU)
    python bench/structured.py --nsamples 8 --seqlen 256 --eval-windows 4 --repeats 9   # reduced budget

Calibration and perplexity run on ``--ppl-threads`` (1) threads, the latency on ``--threads`` (2). On a shared,
oversubscribed CPU OpenMP's spinning barrier makes 2-thread runs several times slower than 1-thread ones, so the
script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP starts: before importing torch
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import transformers
from prunekit.oneshot.data import calibration_windows, evaluation_windows, squad_paragraphs
from prunekit.oneshot.data import CALIBRATION_ARTICLES, HELD_OUT_ARTICLES
from prunekit.oneshot.evaluate import perplexity
from prunekit.oneshot.pipeline import capture_block_inputs
from prunekit.oneshot.structure import find_decoder
from prunekit.oneshot.structured.apply import apply_structured, layer_groups
from prunekit.oneshot.structured.flops import decoder_flops, decoder_params
from prunekit.oneshot.structured.importance import collect_stats
from prunekit.oneshot.structured.options import DEFAULT_COMPENSATION
from prunekit.oneshot.structured.plan import Request, layer_costs, make_plan

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

SMOLLM2 = Path(os.environ.get("PRUNEKIT_SMOLLM2_DIR", Path.home() / ".cache/prunekit-models/smollm2-135m"))
SQUAD = Path(os.environ.get("PRUNEKIT_DATA_DIR", "/work/shared/data")) / "squad" / "dev-v1.1.json"
CUTS = {  # name -> (ffn sparsity, head sparsity)
    "ffn0.15": (0.15, 0.0), "ffn0.33": (0.33, 0.0), "ffn0.5": (0.5, 0.0), "ffn0.15+heads0.34": (0.15, 0.34),
}
METHODS = ("flap", "wanda-sp", "weight-norm")
PRUNEKIT = [sys.executable, "-c", "import sys; from prunekit.cli import main; sys.exit(main())"]


def stack_runner(model: torch.nn.Module, tokens: int) -> Any:
    """A function that runs the decoder blocks once on a captured ``1 x tokens`` input (embeddings excluded)."""
    structure = find_decoder(model)
    ids = torch.arange(tokens).unsqueeze(0) % model.config.vocab_size
    inputs = capture_block_inputs(model, structure, [ids])[0]

    def run() -> None:
        h = inputs.hidden
        for block in structure.layers:
            out = block(h, *inputs.args, **inputs.kwargs)
            h = out if isinstance(out, torch.Tensor) else out[0]
    return run


def alternating_latency(dense: Any, pruned: Any, repeats: int) -> dict[str, Any]:
    """Median seconds of each, timed in alternation (dense, pruned, dense, ...) after one warm-up each."""
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    with torch.inference_mode():
        dense(), pruned()
        for r in range(repeats):
            order = (("dense", dense), ("pruned", pruned)) if r % 2 == 0 else (("pruned", pruned), ("dense", dense))
            for name, fn in order:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    ratios = sorted(d / p for d, p in zip(times["dense"], times["pruned"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"dense_s": med["dense"], "pruned_s": med["pruned"], "speedup": med["dense"] / med["pruned"],
            "paired_ratio_min": ratios[0], "paired_ratio_max": ratios[-1],
            "dense_spread": (max(times["dense"]) - min(times["dense"])) / med["dense"],
            "pruned_spread": (max(times["pruned"]) - min(times["pruned"])) / med["pruned"], "repeats": repeats}


def distill_available() -> bool:
    try:
        done = subprocess.run([*PRUNEKIT, "distill", "--help"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def recover(student: torch.nn.Module, tokenizer: Any, args: argparse.Namespace, eval_ids: torch.Tensor,
            tmp: Path, name: str) -> float | None:
    """Distil ``student`` from the dense model with ``prunekit distill``; held-out perplexity after it."""
    from prunekit.slimming.io import load_slimmed, save_slimmed

    src, out = tmp / f"{name}-student", tmp / f"{name}-recovered"
    save_slimmed(student, src)
    tokenizer.save_pretrained(src)
    train = tmp / "train.txt"
    if not train.exists():
        train.write_text("\n\n".join(squad_paragraphs(SQUAD, CALIBRATION_ARTICLES)), encoding="utf-8")
    cmd = [*PRUNEKIT, "distill", "--student", str(src), "--teacher", str(args.model),
           "--train-text", str(train), "--max-tokens", str(args.recovery_tokens),
           "--seqlen", str(args.recovery_seqlen),
           "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"distill failed for {name}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return perplexity(load_slimmed(out), eval_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=None, help="default: --seqlen")
    parser.add_argument("--tokens", type=int, default=512, help="latency: one sequence of this many tokens")
    parser.add_argument("--repeats", type=int, default=15, help="latency: alternating dense/pruned pairs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the latency runs")
    parser.add_argument("--ppl-threads", type=int, default=1, help="torch threads for calibration / perplexity")
    parser.add_argument("--cuts", nargs="+", default=list(CUTS), choices=list(CUTS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--recovery-tokens", type=int, default=32768)
    parser.add_argument("--recovery-seqlen", type=int, default=256,
                        help="distillation window (256: the done-when run's; 512 is ~1.5x slower on a CPU)")
    parser.add_argument("--no-recovery", action="store_true")
    parser.add_argument("--recover-methods", nargs="+", default=["flap"], choices=list(METHODS),
                        help="methods whose points are distilled (each recovery is ~4 min on a 2-core CPU)")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("structured.png")))
    args = parser.parse_args()
    if args.recovery_seqlen < 2:  # checked before any pruning, not when the first distillation starts
        parser.error(f"--recovery-seqlen: got {args.recovery_seqlen}; allowed >= 2")
    torch.set_num_threads(args.ppl_threads)
    started = time.perf_counter()

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    dense = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cal = calibration_windows(squad_paragraphs(SQUAD, CALIBRATION_ARTICLES), tokenizer, args.nsamples, args.seqlen)
    eval_ids = evaluation_windows(squad_paragraphs(SQUAD, HELD_OUT_ARTICLES), tokenizer,
                                  args.eval_seqlen or args.seqlen, args.eval_windows)
    structure = find_decoder(dense)
    layers = layer_groups(dense, structure)
    costs = [layer_costs(dense, g, structure.layers[g.index]) for g in layers]
    t = time.perf_counter()
    stats = collect_stats(dense, [cal[i:i + 1] for i in range(cal.shape[0])], layers, structure, hessian=False)
    calibration_s = time.perf_counter() - t
    dense_ppl = perplexity(dense, eval_ids, progress=True)
    dense_params = decoder_params(structure)
    dense_flops = decoder_flops(dense, structure, layers, args.tokens)
    dense_run = stack_runner(dense, args.tokens)

    recovery_note = None
    if args.no_recovery:
        recovery_note = "skipped (--no-recovery)"
    elif not distill_available():
        recovery_note = "prunekit distill is not available on this branch; recovery column left empty"
    tmp = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    points = []
    try:
        for cut in args.cuts:
            ffn, heads = CUTS[cut]
            latency = None
            for method in args.methods:
                model = copy.deepcopy(dense)
                st = find_decoder(model)
                request = Request(ffn_sparsity=ffn or None, head_sparsity=heads, method=method)
                plan = make_plan(model, layer_groups(model, st), stats, costs, request)
                mode = DEFAULT_COMPENSATION[method]
                st, applied = apply_structured(model, st, plan, stats, {"ffn": mode, "attention": mode})
                new_layers = layer_groups(model, st)
                point = {"cut": cut, "method": method, "compensation": applied.compensation,
                         "ffn_width": new_layers[0].ffn.width, "heads": new_layers[0].attention.num_heads,
                         "kv_heads": new_layers[0].attention.num_kv_heads,
                         "decoder_fraction_kept": decoder_params(st) / dense_params,
                         "flop_ideal_speedup": dense_flops / decoder_flops(model, st, new_layers, args.tokens),
                         "perplexity": perplexity(model, eval_ids, progress=True)}
                if latency is None:  # latency depends on the widths only: once per cut
                    torch.set_num_threads(args.threads)
                    latency = alternating_latency(dense_run, stack_runner(model, args.tokens), args.repeats)
                    torch.set_num_threads(args.ppl_threads)
                point["latency"] = latency
                point["speedup_vs_ideal"] = latency["speedup"] / point["flop_ideal_speedup"]
                point["recovered_perplexity"] = (
                    None if recovery_note or method not in args.recover_methods
                    else recover(model, tokenizer, args, eval_ids, tmp, f"{cut}-{method}"))
                points.append(point)
                print(json.dumps(point), file=sys.stderr)
                del model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "bench": "structured", "model": args.model, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": args.threads, "ppl_threads": args.ppl_threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "text": "SQuAD dev articles 1-38",
                        "seconds": round(calibration_s, 1)},
        "eval": {"windows": int(eval_ids.shape[0]), "seqlen": int(eval_ids.shape[1]),
                 "text": "SQuAD dev articles 39-48"},
        "latency_tokens": args.tokens, "dense_perplexity": dense_ppl, "recovery_tokens": args.recovery_tokens,
        "recovery_seqlen": args.recovery_seqlen,
        "recovered_methods": [] if recovery_note else list(args.recover_methods), "recovery_note": recovery_note,
        "points": points, "wall_seconds": round(time.perf_counter() - started, 1),
    }
    _plot(result, args.plot)
    print(json.dumps(result, indent=1))


def _plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {"flap": "o", "wanda-sp": "s", "weight-norm": "x"}
    for method in METHODS:
        pts = [p for p in result["points"] if p["method"] == method]
        if pts:
            ax.plot([p["latency"]["speedup"] for p in pts], [p["perplexity"] for p in pts], markers[method],
                    label=f"{method} one-shot")
            rec = [p for p in pts if p["recovered_perplexity"] is not None]
            if rec:
                ax.plot([p["latency"]["speedup"] for p in rec], [p["recovered_perplexity"] for p in rec],
                        markers[method], mfc="none", label=f"{method} + distill")
    ax.axhline(result["dense_perplexity"], color="grey", ls="--", label="dense")
    ax.set(xlabel="measured decoder-stack speed-up (CPU, 2 threads, 1 x 512 tokens)", ylabel="held-out perplexity",
           yscale="log", title="SmolLM2-135M structured one-shot")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
