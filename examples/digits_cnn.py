"""End-to-end offline example: a small CNN on scikit-learn's bundled digits, dense then pruned to 90 % with 4x1.

    python examples/digits_cnn.py            # ~1 minute on one CPU core
    python examples/digits_cnn.py --quick    # a few seconds: 1 + 4 epochs on 320 images (a smoke test)

Shows a progress bar per epoch (loss, sparsity, rate, ETA), then prints dense accuracy, pruned accuracy and the
sparsity report, and writes ``report.json``, ``metrics.json`` and ``checkpoint.pt`` into ``--out`` (refused if it
already holds files, unless ``--overwrite``; written to a temporary folder and moved into place at the end, so an
interrupted run leaves the previous results intact). Everything runs on the CPU with data that ships with
scikit-learn.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import prunekit

BATCH = 32


def load_digits(seed: int = 0, train_samples: int | None = None):
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    end = split if train_samples is None else min(split, train_samples)
    return (x[:end], y[:end]), (x[split:], y[split:])


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model: nn.Module, data) -> float:
    x, y = data
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return correct


def train(model: nn.Module, data, epochs: int, optimizer: torch.optim.Optimizer, seed: int, phase: str,
          pruning: prunekit.Pruning | None = None, progress: bool = True) -> None:
    """``epochs`` epochs of minibatch training, one progress bar per epoch (mean loss so far, sparsity)."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        batches = torch.randperm(len(y), generator=gen).split(BATCH)
        bar = tqdm(batches, desc=f"{phase} {epoch + 1}/{epochs}", unit="step", disable=not progress,
                   mininterval=0.5, dynamic_ncols=True)
        total, seen = 0.0, 0
        for idx in bar:
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()  # with prepare_pruning, this step also updates scores and masks
            optimizer.zero_grad()
            total, seen = total + loss.item(), seen + 1
            postfix = {"loss": f"{total / seen:.3f}"}
            if pruning is not None:
                postfix["sparsity"] = f"{pruning.current_sparsity():.1%}"
            bar.set_postfix(postfix, refresh=False)
        bar.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--pattern", default="4x1")
    parser.add_argument("--dense-epochs", type=int, default=8)
    parser.add_argument("--prune-epochs", type=int, default=12, help="at least 2 (one warm-up epoch, then pruning)")
    parser.add_argument("--train-samples", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --dense-epochs 1 --prune-epochs 4 --train-samples 320")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    args = parser.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.prune_epochs, args.train_samples = 1, 4, 320
    if args.prune_epochs < 2:
        parser.error(f"--prune-epochs: got {args.prune_epochs}; allowed: an int >= 2")
    if args.dense_epochs < 0:
        parser.error(f"--dense-epochs: got {args.dense_epochs}; allowed: an int >= 0")
    if args.train_samples is not None and args.train_samples < BATCH:
        parser.error(f"--train-samples: got {args.train_samples}; allowed: an int >= {BATCH}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        parser.error(f"--out: got {str(out)!r}, which already holds results; allowed: a new or empty folder, "
                     f"or pass --overwrite to replace them")
    return args


def save(out: Path, report, metrics: dict, checkpoint: dict) -> None:
    """Write every result into a temporary sibling folder, then swap it in: nothing is half-written or lost."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    (staging / "report.json").write_text(report.to_json())
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    torch.save(checkpoint, staging / "checkpoint.pt")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)  # kept until the new results are in place
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the metrics it wrote."""
    args = parse_args(argv)  # every bad argument is refused before any training
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_data, test_data = load_digits(train_samples=args.train_samples)
    progress = not args.no_progress

    model = make_model()
    train(model, train_data, args.dense_epochs, torch.optim.AdamW(model.parameters(), lr=2e-3), seed=1,
          phase="dense", progress=progress)
    dense_acc = accuracy(model, test_data)
    print(f"dense accuracy: {dense_acc:.4f}")

    steps_per_epoch = (len(train_data[1]) + BATCH - 1) // BATCH
    total = args.prune_epochs * steps_per_epoch
    cooldown = max(1, args.prune_epochs // 4)  # epochs of fine-tuning at the final sparsity
    config = prunekit.PruningConfig.from_kwargs(
        target_sparsity=args.target, pattern=args.pattern, pruning_type="snip_momentum",
        start_step=steps_per_epoch, end_step=total - cooldown * steps_per_epoch,
        pruning_frequency=max(1, steps_per_epoch // 2), pruning_scope="global")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruning = prunekit.prepare_pruning(model, config, optimizer)
    train(model, train_data, args.prune_epochs, optimizer, seed=2, phase="prune", pruning=pruning,
          progress=progress)
    report = pruning.on_train_end()
    sparse_acc = accuracy(model, test_data)
    print(f"dense accuracy {dense_acc:.4f} -> pruned accuracy {sparse_acc:.4f} "
          f"at {report.pruned_layers_sparsity:.2%} sparsity ({args.pattern}) of the pruned layers")

    metrics = {"dense_accuracy": dense_acc, "pruned_accuracy": sparse_acc,
               "sparsity": report.pruned_layers_sparsity}
    save(Path(args.out), report, metrics, {"model": model.state_dict(), "pruning": pruning.state_dict()})
    print(f"results in {args.out}/ (report.json, metrics.json, checkpoint.pt)")
    return metrics


if __name__ == "__main__":
    main()
