"""End-to-end offline example: a small CNN on scikit-learn's bundled digits, dense then pruned to 90 % with 4x1.

    python examples/digits_cnn.py            # ~1 minute on one CPU core

Prints dense accuracy, pruned accuracy and the sparsity report, and writes the report as JSON next to this file's
output directory (``--out``). Everything runs on the CPU with data that ships with scikit-learn.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import prunekit


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return (x[:split], y[:split]), (x[split:], y[split:])


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


def train(model: nn.Module, data, epochs: int, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()  # with prepare_pruning, this step also updates scores and masks
            optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--pattern", default="4x1")
    parser.add_argument("--dense-epochs", type=int, default=8)
    parser.add_argument("--prune-epochs", type=int, default=12)
    parser.add_argument("--out", default="runs/digits")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_data, test_data = load_digits()

    model = make_model()
    train(model, train_data, args.dense_epochs, torch.optim.AdamW(model.parameters(), lr=2e-3), seed=1)
    dense_acc = accuracy(model, test_data)
    print(f"dense accuracy: {dense_acc:.4f}")

    steps_per_epoch = (len(train_data[1]) + 31) // 32
    total = args.prune_epochs * steps_per_epoch
    config = prunekit.PruningConfig.from_kwargs(
        target_sparsity=args.target, pattern=args.pattern, pruning_type="snip_momentum",
        start_step=steps_per_epoch, end_step=total - 3 * steps_per_epoch, pruning_frequency=steps_per_epoch // 2,
        pruning_scope="global")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruning = prunekit.prepare_pruning(model, config, optimizer)
    train(model, train_data, args.prune_epochs, optimizer, seed=2)
    report = pruning.on_train_end()
    sparse_acc = accuracy(model, test_data)
    print(f"dense accuracy {dense_acc:.4f} -> pruned accuracy {sparse_acc:.4f} "
          f"at {report.pruned_layers_sparsity:.2%} sparsity ({args.pattern}) of the pruned layers")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json())
    (out / "metrics.json").write_text(json.dumps({"dense_accuracy": dense_acc, "pruned_accuracy": sparse_acc,
                                                  "sparsity": report.pruned_layers_sparsity}, indent=2))
    torch.save({"model": model.state_dict(), "pruning": pruning.state_dict()}, out / "checkpoint.pt")


if __name__ == "__main__":
    main()
