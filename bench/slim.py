"""CPU latency of slimmed vs masked-dense transformer bodies (prunekit.slimming).

For each shape: random weights from a config (no downloads), zero the lowest-norm 50 % of every FFN's channels
(columns of the second linear, as channelx1 does) and 50 % of every attention block's heads (q rows + o columns,
as the mha pattern does; for grouped-query attention the lowest half *within each key/value group*, which is the
legal shape), then time the masked model against its slimmed copy: batch 8 x 128 tokens, torch.inference_mode(),
one thread, runs interleaved dense/slim, median reported. The ideal speed-up is the ratio of matmul FLOPs
(every Linear/Conv1D + q @ kᵀ and p @ v) counted on the same forward.

    nice python bench/slim.py                      # all four shapes (slow on a shared CPU)
    python bench/slim.py --quick                   # BERT-mini only, batch 2 x 32, 5 runs
    python bench/slim.py --shapes bert-mini gpt2-small --runs 30
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

import transformers
from prunekit.slimming import AttentionGroup, FFNGroup, detect, slim
from prunekit.slimming.layers import layer_ops

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

SHAPES: dict[str, Callable[[], nn.Module]] = {
    "bert-mini": lambda: transformers.BertModel(transformers.BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)),
    "bert-base": lambda: transformers.BertModel(transformers.BertConfig()),
    "gpt2-small": lambda: transformers.GPT2Model(transformers.GPT2Config()),
    # Llama-style: SwiGLU, rotary, grouped-query attention (16 query heads over 4 key/value heads).
    "llama-style": lambda: transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=2816, max_position_embeddings=512)),
}


def _zero_lowest_channels(model: nn.Module, group: FFNGroup, fraction: float) -> None:
    consumer = model.get_submodule(group.consumer)
    ops = layer_ops(consumer)
    norms = ops.weight_2d(consumer).detach().norm(dim=0)
    lowest = norms.argsort()[: int(round(fraction * group.width))]
    with torch.no_grad():
        consumer.weight.index_fill_(ops.in_dim, lowest, 0.0)


def _zero_lowest_heads(model: nn.Module, group: AttentionGroup, fraction: float) -> None:
    def norm(h: int) -> float:
        total = 0.0
        for s in group.query_head_slices(h):
            total += float(model.get_submodule(s.module).weight[s.weight_index(model)].float().pow(2).sum())
        return total

    per_kv = int(round(fraction * group.heads_per_kv)) if group.is_gqa else None
    if per_kv is None:
        heads = sorted(range(group.num_heads), key=norm)[: int(round(fraction * group.num_heads))]
    else:  # lowest half within each key/value group keeps the GQA shape legal
        heads = [h for g in range(group.num_kv_heads) for h in sorted(group.query_heads_of(g), key=norm)[:per_kv]]
    with torch.no_grad():
        for h in heads:
            for s in group.head_slices(h):
                model.get_submodule(s.module).weight[s.weight_index(model)] = 0.0


def matmul_flops(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of every layer call plus the two attention products, counted on one forward."""
    total = 0

    def count(module: nn.Module, args: tuple, _out: Any) -> None:
        nonlocal total
        ops = layer_ops(module)
        rows = args[0].numel() // ops.in_features(module)
        total += 2 * rows * ops.in_features(module) * ops.out_features(module)

    handles = [m.register_forward_hook(count) for m in model.modules() if layer_ops(m) is not None]
    with torch.inference_mode():
        model(**inputs)
    for h in handles:
        h.remove()
    batch, tokens = inputs["input_ids"].shape
    for group in detect(model).attention:
        total += 2 * 2 * batch * group.num_heads * tokens * tokens * group.head_dim
    return total


def _time(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(**inputs)
    return time.perf_counter() - start


def bench(name: str, batch: int, tokens: int, runs: int, fraction: float) -> dict[str, Any]:
    torch.manual_seed(0)
    dense = SHAPES[name]().eval()
    found = detect(dense)
    for g in found.ffn:
        _zero_lowest_channels(dense, g, fraction)
    for g in found.attention:
        _zero_lowest_heads(dense, g, fraction)
    slimmed = copy.deepcopy(dense)
    report = slim(slimmed)
    vocab = dense.config.vocab_size
    inputs = {"input_ids": torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1)),
              "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}
    inputs["attention_mask"][1::2, tokens * 3 // 4:] = 0  # padding in every other row
    with torch.inference_mode():
        diff = (dense(**inputs).last_hidden_state - slimmed(**inputs).last_hidden_state).abs()
        diff = float((diff * inputs["attention_mask"][..., None]).max())
        for _ in range(2):  # warm-up
            _time(dense, inputs), _time(slimmed, inputs)
        t_dense, t_slim = [], []
        for _ in range(runs):
            t_dense.append(_time(dense, inputs))
            t_slim.append(_time(slimmed, inputs))
    f_dense, f_slim = matmul_flops(dense, inputs), matmul_flops(slimmed, inputs)
    measured = statistics.median(t_dense) / statistics.median(t_slim)
    ideal = f_dense / f_slim
    return {
        "shape": name, "batch": batch, "tokens": tokens, "runs": runs,
        "dense_ms": round(1000 * statistics.median(t_dense), 2),
        "slim_ms": round(1000 * statistics.median(t_slim), 2),
        "measured_speedup": round(measured, 3), "ideal_speedup": round(ideal, 3),
        "measured_over_ideal": round(measured / ideal, 3),
        "params_dense": report.params_before, "params_slim": report.params_after,
        "gflops_dense": round(f_dense / 1e9, 2), "gflops_slim": round(f_slim / 1e9, 2),
        "max_abs_diff": diff,
        "heads": [f"{a.heads_before}->{a.heads_after}" for a in report.attention][:1],
        "ffn": [f"{f.width_before}->{f.width_after}" for f in report.ffn][:1],
    }


def environment() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of FFN channels and heads zeroed")
    parser.add_argument("--quick", action="store_true", help="bert-mini only, batch 2 x 32 tokens, 5 runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.batch, args.tokens, args.runs = ["bert-mini"], 2, 32, 5
    torch.set_num_threads(1)
    results = []
    for name in args.shapes:
        results.append(bench(name, args.batch, args.tokens, args.runs, args.fraction))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"environment": environment(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
