"""Shared fixtures and helpers for the core-engine tests.

The machine running the suite is small and shared, so every test runs single-threaded on tiny models. Helpers
that several test files use live here (import them with ``from conftest import ...``; ``tests/`` is on
``sys.path`` under pytest's default import mode).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.masks import PrunedLayer


@pytest.fixture(autouse=True)
def _single_thread_and_seeded():
    """One intra-op thread (the CPU cores are shared) and a fixed seed for every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    """fc1 → fc2 → fc3 → out; ``out`` is the output head (never pruned unless named)."""

    def __init__(self, sizes=(16, 32, 32, 32, 4), seed: int = 0) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])
        self.out = nn.Linear(sizes[3], sizes[4])
        torch.random.set_rng_state(gen_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.out(x)


def batch(step: int, size: int = 16, in_dim: int = 16, classes: int = 4, seed: int = 1234):
    """The deterministic batch of a given step (same data whatever process or restart asks for it)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(size, in_dim, generator=gen)
    y = torch.randint(0, classes, (size,), generator=gen)
    return x, y


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, **batch_kw) -> torch.Tensor:
    """One plain PyTorch step (forward, backward, optimizer.step, zero_grad) on ``batch(step)``."""
    x, y = batch(step, **batch_kw)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def full_mask(layer: PrunedLayer) -> torch.Tensor:
    """A layer's keep-mask at full weight shape (True = kept)."""
    return layer.bound.expand(layer.mask).reshape(layer.weight.shape)


def masks_of(pruning) -> dict[str, torch.Tensor]:
    """Full-shape keep-masks of every pruned layer, by layer name."""
    return {layer.name: full_mask(layer).clone() for layer in pruning.layers}


def nonzero_weight_(module: nn.Module, gen: torch.Generator | None = None) -> None:
    """Give ``module.weight`` random values none of which is zero (so zeros can only come from pruning)."""
    with torch.no_grad():
        w = torch.randn(module.weight.shape, generator=gen)
        w = w + torch.where(w >= 0, 0.05, -0.05)
        module.weight.copy_(w)
