"""The prunekit side of bench/oneshot.py: one ``prunekit.oneshot`` call in its own process (project venv).

    python bench/prunekit_oneshot_run.py --model DIR --calibration calib.pt --method sparsegpt --pattern 2:4 --output OUT

Same inputs as bench/llmc_oneshot.py (the orchestrator's token windows, float32, CPU) and the same settings as
llm-compressor's defaults (block_size 128, dampening 0.01). Last stdout line: one JSON object with the wall times.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--calibration", required=True, help=".pt file holding a LongTensor [nsamples, seqlen]")
    p.add_argument("--method", required=True, choices=("sparsegpt", "wanda", "magnitude"))
    p.add_argument("--pattern", required=True, help="1x1 or N:M, e.g. 2:4")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dampening", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="new directory for the pruned model (must not exist)")
    args = p.parse_args(argv)
    if Path(args.output).exists():
        p.error(f"--output {args.output} exists; give a new directory")
    return args


def oneshot_function():
    """``prunekit.oneshot``, whether the package exports the function or only its ``prunekit.oneshot`` module."""
    import types

    import prunekit

    fn = getattr(prunekit, "oneshot", None)
    if isinstance(fn, types.ModuleType):
        fn = getattr(fn, "oneshot", None)
    return fn if callable(fn) else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    import prunekit

    t_import = time.perf_counter()
    windows = torch.load(args.calibration, weights_only=True)  # token ids only: never unpickle code
    nsamples, seqlen = windows.shape
    config = {"method": args.method, "pattern": args.pattern, "target_sparsity": args.sparsity,
              "nsamples": nsamples, "seqlen": seqlen, "block_size": args.block_size,
              "dampening": args.dampening, "seed": args.seed}
    oneshot = oneshot_function()
    if oneshot is None:
        raise SystemExit("prunekit.oneshot is not available in this venv's prunekit")
    report = oneshot(args.model, calibration=windows, config=config, output_dir=args.output)
    t_end = time.perf_counter()
    to_dict = getattr(report, "to_dict", None)
    record = {
        "tool": "prunekit",
        "version": getattr(prunekit, "__version__", "unknown"),
        "torch": torch.__version__,
        "method": args.method,
        "pattern": args.pattern,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "config": config,
        "threads": torch.get_num_threads(),
        "import_s": t_import - t_start,
        "oneshot_s": t_end - t_import,  # load + calibrate + prune + save, all inside prunekit.oneshot
        "total_s": t_end - t_start,
    }
    if callable(to_dict):
        summary = to_dict()
        record["report"] = {k: v for k, v in summary.items() if k != "layers"} if isinstance(summary, dict) else summary
    print(json.dumps(record, default=str), flush=True)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
