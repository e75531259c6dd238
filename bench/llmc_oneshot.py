"""The peer side of bench/oneshot.py: llm-compressor 0.14's one-shot pruning, run INSIDE the peer venv.

    /work/bench-venv/bin/python bench/llmc_oneshot.py --model DIR --calibration calib.pt \\
        --method sparsegpt --pattern 2:4 --output OUT

Loads the model in float32 on CPU, calibrates on the orchestrator's token windows (a .pt LongTensor
[nsamples, seqlen], passed as a tokenized ``datasets.Dataset`` so llm-compressor neither re-tokenizes nor
truncates), runs ``oneshot`` with SparseGPTModifier or WandaPruningModifier through the sequential (layer by layer)
pipeline, and writes the pruned model with the plain transformers ``save_pretrained`` (dense safetensors, no
compressed-tensors config), so the orchestrator reloads it with transformers alone. Last stdout line: one JSON
object with the phase wall times.

Modifier settings are llm-compressor's own defaults (read from the 0.14.0.1 source,
modifiers/pruning/sparsegpt/base.py and sgpt_base.py): block_size=128, dampening_frac=0.01 (fraction of the mean
Hessian diagonal), preserve_sparsity_mask=False, offload_hessians=False, sparsity_profile=None (uniform);
mask_structure "0:0" means unstructured. ``targets=["Linear"]`` + ``ignore=["re:.*lm_head"]`` is the modifier
docstring's own recipe: every Linear of the decoder, never the (tied) output head.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PATTERNS = {"1x1": "0:0", "2:4": "2:4"}  # prunekit pattern name -> llm-compressor mask_structure
METHODS = ("sparsegpt", "wanda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--calibration", required=True, help=".pt file holding a LongTensor [nsamples, seqlen]")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--pattern", required=True, choices=sorted(PATTERNS))
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (ignored by N:M masks)")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT lazy-update block (llm-compressor default)")
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening_frac (llm-compressor default)")
    p.add_argument("--output", required=True, help="new directory for the pruned model (must not exist)")
    args = p.parse_args(argv)
    if Path(args.output).exists():
        p.error(f"--output {args.output} exists; give a new directory")
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity {args.sparsity}: allowed 0 < sparsity < 1")
    return args


def build_modifier(method: str, pattern: str, sparsity: float, block_size: int, dampening: float):
    """The llm-compressor modifier for one bench cell."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = dict(sparsity=sparsity, mask_structure=PATTERNS[pattern], targets=["Linear"], ignore=["re:.*lm_head"])
    if method == "sparsegpt":
        return SparseGPTModifier(block_size=block_size, dampening_frac=dampening, **common)
    return WandaPruningModifier(**common)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot

    t_import = time.perf_counter()
    windows = torch.load(args.calibration, weights_only=True)  # token ids only: never unpickle code
    if windows.dtype != torch.long or windows.dim() != 2:
        raise SystemExit(f"--calibration {args.calibration}: expected a LongTensor [nsamples, seqlen], "
                         f"got {windows.dtype} {tuple(windows.shape)}")
    nsamples, seqlen = windows.shape
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    decoder_layer = type(model.model.layers[0]).__name__
    t_load = time.perf_counter()

    modifier = build_modifier(args.method, args.pattern, args.sparsity, args.block_size, args.dampening)
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=modifier,
        dataset=dataset,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        batch_size=1,
        shuffle_calibration_samples=False,  # same windows in the same order as the other tool
        pipeline="sequential",
        sequential_targets=[decoder_layer],
        output_dir=None,  # saved below with the plain transformers writer
    )
    t_prune = time.perf_counter()

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # oneshot wraps model.save_pretrained with a compressed-tensors writer; call the class's own method instead
    type(model).save_pretrained(model, tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    t_end = time.perf_counter()

    record = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "method": args.method,
        "pattern": args.pattern,
        "mask_structure": PATTERNS[args.pattern],
        "nsamples": nsamples,
        "seqlen": seqlen,
        "modifier": modifier.model_dump(include={"sparsity", "mask_structure", "targets", "ignore", "block_size",
                                                  "dampening_frac", "sparsity_profile"}),
        "pipeline": "sequential",
        "sequential_targets": [decoder_layer],
        "threads": torch.get_num_threads(),
        "import_s": t_import - t_start,
        "load_s": t_load - t_import,
        "prune_s": t_prune - t_load,
        "save_s": t_end - t_prune,
        "total_s": t_end - t_start,
    }
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
