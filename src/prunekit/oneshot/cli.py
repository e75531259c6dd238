"""``prunekit oneshot``: prune a Hugging Face causal LM in one shot and write a normal checkout.

    prunekit oneshot --model DIR_OR_HUB_ID --method sparsegpt --pattern 2:4 --calibration text.txt \\
        --nsamples 128 --seqlen 2048 --seed 0 --output pruned/

The flags map onto :class:`~prunekit.oneshot.config.OneShotConfig` keys; ``--config FILE.yaml`` supplies any of
them and flags given on the command line win. Other commands extend the parser through
:func:`add_oneshot_arguments` (e.g. structured removal adds its own flags and handler).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# flag destination -> OneShotConfig key
CONFIG_FLAGS = {
    "method": "method", "pattern": "pattern", "sparsity": "target_sparsity", "nsamples": "nsamples",
    "seqlen": "seqlen", "seed": "seed", "device": "device", "dtype": "dtype", "profile": "profile",
    "owl_threshold": "owl_threshold", "owl_lambda": "owl_lambda", "block_size": "block_size",
    "dampening": "dampening", "dsnot": "dsnot", "true_sequential": "true_sequential",
}


def add_oneshot_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prunekit oneshot`` flags to ``parser`` (defaults None: the config's defaults apply)."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="Hugging Face model directory (safetensors) or hub id")
    g.add_argument("--calibration", required=True,
                   help="calibration text: a .txt file (one document), a .jsonl file, a SQuAD .json, or a "
                        "Hugging Face dataset name (name or name:config)")
    g.add_argument("--dataset-split", default="train", help="split of a dataset given by name (default: train)")
    g.add_argument("--text-column", default="text", help="text field of .jsonl lines / dataset rows")
    g.add_argument("--output", required=True, help="new directory for the pruned checkout (must not exist)")
    g.add_argument("--eval-text", default=None,
                   help="held-out text file: perplexity before and after (loads the whole model for it)")
    g.add_argument("--eval-windows", type=int, default=16, help="at most this many --seqlen windows of it")
    p = parser.add_argument_group("pruning (override --config)")
    p.add_argument("--config", default=None, help="YAML file of one-shot config keys")
    p.add_argument("--method", default=None, help="sparsegpt, wanda, magnitude, ...")
    p.add_argument("--pattern", default=None, help="1x1 (unstructured) or N:M such as 2:4, 4:8")
    p.add_argument("--sparsity", type=float, default=None, help="target sparsity in [0, 1) (N:M: N/M)")
    p.add_argument("--profile", default=None, help="sparsity per block: uniform or owl")
    p.add_argument("--owl-threshold", type=float, default=None, help="OWL outlier multiple M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=None, help="OWL largest deviation (default 0.08)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=None, help="seed of the window offsets (default 0)")
    p.add_argument("--block-size", type=int, default=None, help="SparseGPT columns per lazy block (128)")
    p.add_argument("--dampening", type=float, default=None, help="SparseGPT dampening fraction (0.01)")
    p.add_argument("--dsnot", action="store_true", default=None, help="refine Wanda masks with DSnoT")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="prune each block's linears group by group (q/k/v, o, gate/up, down), each calibrated "
                        "on the already pruned ones (default: on for sparsegpt, off for wanda)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute and output dtype (default: the checkpoint's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def oneshot_parser(prog: str = "prunekit oneshot") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="One-shot pruning of a decoder LLM from calibration "
                                     "text; writes a Hugging Face checkout with report.json and report.png.")
    return add_oneshot_arguments(parser)


def config_from_args(args: argparse.Namespace) -> Any:
    """The OneShotConfig of ``--config`` with every flag given on the command line applied over it."""
    from prunekit.oneshot.config import OneShotConfig, load_oneshot_config

    base = load_oneshot_config(args.config) if args.config else OneShotConfig.model_construct()
    data = {k: getattr(base, k) for k in base.model_fields_set}
    data.update({key: getattr(args, flag) for flag, key in CONFIG_FLAGS.items() if getattr(args, flag) is not None})
    if args.pattern is not None and ":" in args.pattern and args.sparsity is None:
        data.pop("target_sparsity", None)  # an N:M pattern from the command line sets its own N/M
    return OneShotConfig(**data)


def run_oneshot(args: argparse.Namespace) -> int:
    """Validate everything, then prune; print the report. Raises PrunekitError on bad input (exit 2)."""
    from prunekit.oneshot.api import check_output_dir, oneshot
    from prunekit.oneshot.checkpoint import Checkpoint

    cfg = config_from_args(args)
    out = check_output_dir(args.output)
    eval_windows, tokenizer = None, None
    if args.eval_text is not None:
        from prunekit.oneshot.data import evaluation_windows, load_texts

        texts = load_texts(args.eval_text, key="eval_text", held_out=True)
        tokenizer = Checkpoint(args.model, cfg.dtype).tokenizer()
        eval_windows = evaluation_windows(texts, tokenizer, cfg.seqlen, args.eval_windows)
    before = _perplexity(args.model, eval_windows, cfg) if eval_windows is not None else None
    report = oneshot(args.model, args.calibration, cfg, output_dir=out, tokenizer=tokenizer,
                     progress=not args.quiet, dataset_split=args.dataset_split, text_column=args.text_column)
    if eval_windows is not None:
        report.perplexity = {"dense": before, "pruned": _perplexity(out, eval_windows, cfg)}
        (Path(out) / "report.json").write_text(report.to_json(), encoding="utf-8")
    print(report.table())
    print(f"report: {Path(out) / 'report.json'}, {Path(out) / 'report.png'}")
    return 0


def _perplexity(model_dir: Any, windows: Any, cfg: Any) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from prunekit.oneshot.api import resolve_device
    from prunekit.oneshot.evaluate import perplexity

    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    try:
        return perplexity(model, windows, device=device)
    finally:
        del model
