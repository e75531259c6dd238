"""One global 1x1 magnitude pruning event over 1e9 weights held as many tensors: time and extra memory.

The model is 1000 bias-free Linear(1000, 1000) layers (1e9 fp32 weights, 4 GB) plus a small head. Peak resident
memory is read from the kernel (``ru_maxrss``) in a fresh process; "extra" is the peak during the event above the
resident memory just before it (weights and masks already allocated), and the mask storage itself is reported
separately. Target: extra memory <= 15 % of the weights' bytes.

    python bench/global_scale.py [--layers 1000] [--width 1000] [--packed/--no-packed]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch
from torch import nn

import prunekit
import prunekit.kernels


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc otherwise keeps freed blocks in its heap (a growing mmap threshold), so resident memory would
        # count memory already released; a fixed threshold returns every large block to the kernel on free
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                        help="low_memory_usage: bit-packed element masks (default on)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    body = nn.Sequential(*[nn.Linear(args.width, args.width, bias=False, device="meta") for _ in range(args.layers)])
    body.to_empty(device="cpu")
    for layer in body:
        layer.weight.data.normal_()
    model = nn.Sequential(body, nn.Linear(args.width, 2))
    weights = sum(l.weight.numel() for l in body)
    weight_bytes = weights * 4
    config = {"target_sparsity": args.target, "pattern": "1x1", "pruning_type": "magnitude",
              "pruning_scope": "global", "start_step": 0, "end_step": 0, "op_names": ["^0\\."],
              "low_memory_usage": args.packed, "max_sparsity_ratio_per_op": 0.98}
    before_masks = rss_bytes()
    pruning = prunekit.Pruning(model, config)
    mask_bytes = rss_bytes() - before_masks
    baseline = rss_bytes()
    assert peak_bytes() <= baseline + (64 << 20), "an earlier peak would hide the event's"
    began = time.perf_counter()
    pruning.on_train_begin()  # the one-shot event at step 0
    seconds = time.perf_counter() - began
    extra = max(0, peak_bytes() - baseline)
    zeros = sum(layer.zeros() for layer in pruning.layers)
    print(json.dumps({
        "bench": "global_scale", "torch": torch.__version__, "threads": args.threads,
        "cpu_kernels": prunekit.kernels.cpu_kernels() is not None,
        "machine": platform.machine(), "weights": weights, "tensors": args.layers,
        "weight_bytes": weight_bytes, "packed_masks": args.packed,
        "event_seconds": round(seconds, 2),
        "event_extra_bytes": extra, "event_extra_fraction": round(extra / weight_bytes, 4),
        "mask_bytes": mask_bytes, "mask_fraction": round(mask_bytes / weight_bytes, 4),
        "extra_including_masks_fraction": round((extra + mask_bytes) / weight_bytes, 4),
        "sparsity": round(zeros / weights, 6), "target": args.target,
    }, indent=2))


if __name__ == "__main__":
    main()
