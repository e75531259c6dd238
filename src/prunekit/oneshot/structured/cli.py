"""``prunekit oneshot --structured``: remove FFN channels, heads and layers physically, save a normal HF model.

``add_structured_arguments(parser)`` adds the structured flags (and the calibration flags, unless the parser
already has them: the unstructured command defines the same ones); ``run_structured(args)`` runs and returns
the exit status — 2 with one ``error:`` line for bad input, always before any calibration work starts.
Stand-alone: ``python -m prunekit.oneshot.structured --model DIR --calibration FILE --output DIR ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
REPORT_JSON = "structured_report.json"
REPORT_PNG = "structured_report.png"
LATENCY_TOKENS = 512  # the FLOP-ideal speed-up is given for one sequence of this length


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    if flag not in parser._option_string_actions:  # shared with the unstructured command's parser
        parser.add_argument(flag, **kwargs)


def add_structured_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the structured flags (and any missing calibration flag) to ``parser``; returns it."""
    _add(parser, "--model", required=True, help="a transformers causal LM directory or hub name")
    _add(parser, "--calibration", default=None,
         help="calibration text: .txt, .jsonl, SQuAD .json (articles 1-38) or a datasets name")
    _add(parser, "--nsamples", type=int, default=128, help="calibration windows")
    _add(parser, "--seqlen", type=int, default=2048, help="tokens per calibration window")
    _add(parser, "--seed", type=int, default=0, help="seed of the calibration window offsets")
    _add(parser, "--output", required=True, help="output directory (must not exist)")
    _add(parser, "--device", default=None, help="where blocks compute (default: cuda when available, else cpu)")
    _add(parser, "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="load dtype")
    _add(parser, "--eval-text", default=None,
         help="held-out text for perplexity before/after (SQuAD .json: articles 39-48)")
    _add(parser, "--eval-windows", type=int, default=16, help="held-out windows of --seqlen tokens")
    _add(parser, "--structured", action="store_true", help="structured (physical) removal")
    g = parser.add_argument_group("structured")
    g.add_argument("--ffn-sparsity", type=float, default=None, help="fraction of FFN channels removed")
    g.add_argument("--head-sparsity", type=float, default=0.0, help="fraction of attention query heads removed")
    g.add_argument("--drop-layers", type=int, default=0, help="remove the N lowest-influence decoder layers")
    g.add_argument("--target-params", type=float, default=None,
                   help="fraction of decoder parameters kept; solves for the FFN width")
    g.add_argument("--method", default="flap", help="importance: flap, wanda-sp or weight-norm")
    g.add_argument("--round-to", type=int, default=32, help="FFN widths become a multiple of this")
    g.add_argument("--non-uniform", action="store_true",
                   help="per-layer FFN widths (global ranking); reload with prunekit.load_slimmed")
    g.add_argument("--head-cut", default="auto", help="auto, kv-groups or query-heads (grouped-query attention)")
    g.add_argument("--compensation", default=None,
                   help="auto, bias, lstsq or none (default: auto for flap, none otherwise)")
    return parser


def build_parser(prog: str = "python -m prunekit.oneshot.structured") -> argparse.ArgumentParser:
    """The stand-alone parser (the same flags the coordinator wires under ``prunekit oneshot``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    return add_structured_arguments(parser)


def _options(args: argparse.Namespace) -> Any:
    from prunekit.oneshot.structured.options import StructuredOptions

    return StructuredOptions(method=args.method, ffn_sparsity=args.ffn_sparsity, head_sparsity=args.head_sparsity,
                             drop_layers=args.drop_layers, target_params=args.target_params,
                             round_to=args.round_to, non_uniform=args.non_uniform, head_cut=args.head_cut,
                             compensation=args.compensation)


def read_texts(source: str, key: str, held_out: bool = False) -> list[str]:
    """Documents of ``source``; a SQuAD JSON gives its calibration (1-38) or held-out (39-48) articles."""
    from prunekit.oneshot.data import load_texts

    return load_texts(source, key=key, held_out=held_out)


def _check_ints(args: argparse.Namespace) -> None:
    from prunekit.errors import ConfigError

    for key, low in (("nsamples", 1), ("seqlen", 2), ("eval_windows", 1)):
        if getattr(args, key) < low:
            raise ConfigError(key, getattr(args, key), f"allowed: an int >= {low}")


def model_shape_from_config(config: Any) -> Any:
    """Layer, FFN width and head counts from a transformers config (None fields when it lacks them)."""
    from prunekit.oneshot.structured.plan import ModelShape

    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    width = next((getattr(config, n) for n in ("intermediate_size", "ffn_dim", "n_inner")
                  if getattr(config, n, None)), None)
    if width is None and getattr(config, "model_type", "") == "gpt2":
        width = 4 * config.n_embd
    if None in (layers, heads, width):
        return None
    return ModelShape(int(layers), int(width), int(heads), int(kv))


def _shape_from_groups(layers: list[Any]) -> Any:
    from prunekit.oneshot.structured.plan import ModelShape

    ffn = next((g.ffn for g in layers if g.ffn is not None), None)
    attn = next((g.attention for g in layers if g.attention is not None), None)
    return ModelShape(len(layers), ffn.width if ffn else 0, attn.num_heads if attn else 0,
                      attn.num_kv_heads if attn else 0)


def _check_compensation(model: Any, layers: list[Any], request: Any, mode: str) -> dict[str, str]:
    """The concrete correction per cut part; raises now if ``mode`` cannot apply (a bias no reload keeps)."""
    from prunekit.oneshot.structured import compensate

    cuts = {"ffn": request.ffn_sparsity or request.target_params, "attention": request.head_sparsity}
    resolved = {}
    for kind, member in (("ffn", "consumer"), ("attention", "o")):
        group = next((getattr(g, kind) for g in layers if getattr(g, kind) is not None), None)
        if cuts[kind] and group is not None:
            resolved[kind] = compensate.resolve(mode, model, model.get_submodule(getattr(group, member)), kind)
    return resolved


def _batches(windows: Any) -> list[Any]:
    return [windows[i:i + 1] for i in range(windows.shape[0])]


def run_structured(args: argparse.Namespace) -> int:
    """Run the structured command; 0 on success, 2 with a one-line error for bad input."""
    from prunekit.errors import PrunekitError

    prog = "prunekit oneshot --structured"
    try:
        _run(args)
    except (PrunekitError, FileNotFoundError, OSError) as exc:
        if os.environ.get("PRUNEKIT_DEBUG"):
            raise
        print(f"{prog}: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from prunekit.errors import ConfigError
    from prunekit.oneshot.data import calibration_windows, evaluation_windows
    from prunekit.oneshot.structure import find_decoder
    from prunekit.oneshot.structured.apply import apply_structured, layer_groups
    from prunekit.oneshot.structured.flops import decoder_flops, decoder_params
    from prunekit.oneshot.structured.importance import SCORES, collect_stats
    from prunekit.oneshot.structured.plan import check_request, layer_costs, make_plan, solve_width
    from prunekit.oneshot.structured.heads import shapes_for
    from prunekit.slimming.io import save_slimmed

    start = time.perf_counter()
    options = _options(args)
    request = options.request()
    _check_ints(args)
    output = Path(args.output)
    if output.exists():
        raise ConfigError("output", str(output), "allowed: a directory that does not exist yet (nothing is "
                          "overwritten)")
    from prunekit.oneshot.checkpoint import resolve_model_dir

    args.model = str(resolve_model_dir(args.model))  # a missing dir or unreachable hub id: one line, no traceback
    config = transformers.AutoConfig.from_pretrained(args.model)
    early = model_shape_from_config(config)
    if early is not None:
        check_request(early, request)
    scorer = SCORES.get(options.method)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    structure = find_decoder(model)
    layers = layer_groups(model, structure)
    check_request(_shape_from_groups(layers), request)
    resolved = _check_compensation(model, layers, request, options.compensation_mode)
    costs = [layer_costs(model, g, structure.layers[g.index]) for g in layers]
    if request.target_params is not None:  # feasibility before calibration (costs are the same per layer)
        first = next(g.attention for g in layers if g.attention is not None)
        heads, kv = costs[0].heads, costs[0].kv_heads
        if request.head_sparsity > 0:
            s = shapes_for(first.num_heads, first.num_kv_heads, request.head_sparsity, request.head_cut)[0]
            heads, kv = s.heads, s.groups
        solve_width(costs, list(range(len(layers) - request.drop_layers)), heads, kv, request.target_params,
                    request.round_to)
    needs_data = scorer.needs_data or request.drop_layers > 0 or options.compensation_mode != "none"
    windows = eval_windows = None
    if needs_data:
        if args.calibration is None:
            raise ConfigError("calibration", None, f"allowed: a text file, SQuAD .json or dataset name (method "
                              f"{options.method!r}, layer dropping and compensation read calibration data)")
        windows = calibration_windows(read_texts(args.calibration, "calibration"), tokenizer, args.nsamples,
                                      args.seqlen, args.seed)
    if args.eval_text:
        eval_windows = evaluation_windows(read_texts(args.eval_text, "eval_text", held_out=True), tokenizer,
                                          args.seqlen, args.eval_windows)

    params_before = sum(p.numel() for p in model.parameters())
    decoder_before = decoder_params(structure)
    flops_before = decoder_flops(model, structure, layers, LATENCY_TOKENS)
    ppl_before = _perplexity(model, eval_windows, device)

    t_cal = time.perf_counter()
    stats = []
    if windows is not None:
        stats = collect_stats(model, _batches(windows), layers, structure,
                              hessian="lstsq" in resolved.values(), device=device)
    t_cal = time.perf_counter() - t_cal
    plan = make_plan(model, layers, stats, costs, request)
    modes = {"ffn": options.compensation_mode, "attention": options.compensation_mode}
    structure, applied = apply_structured(model, structure, plan, stats, modes)
    new_layers = layer_groups(model, structure)
    ppl_after = _perplexity(model, eval_windows, device)

    report = {
        "model": str(args.model), "method": options.method, "compensation": applied.compensation,
        "bias_flags_set": applied.bias_flags, "request": options.model_dump(),
        "calibration": {"source": args.calibration, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed} if windows is not None else None,
        "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
        "decoder_params_before": decoder_before, "decoder_params_after": decoder_params(structure),
        "dropped_layers": plan.drop, "kept_layers": applied.kept_layers,
        "block_influence": [round(x, 6) for x in plan.influence],
        "ffn_widths": [g.ffn.width if g.ffn else None for g in new_layers],
        "heads": [g.attention.num_heads if g.attention else None for g in new_layers],
        "kv_heads": [g.attention.num_kv_heads if g.attention else None for g in new_layers],
        "flop_ideal_speedup": flops_before / decoder_flops(model, structure, new_layers, LATENCY_TOKENS),
        "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "eval": {"source": args.eval_text, "windows": int(eval_windows.shape[0]), "seqlen": args.seqlen}
        if eval_windows is not None else None,
        "calibration_seconds": round(t_cal, 2),
    }
    report["decoder_fraction_kept"] = report["decoder_params_after"] / report["decoder_params_before"]

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_slimmed(model, tmp)
        tokenizer.save_pretrained(tmp)
        report["loads_with"] = _reload_check(model, tmp)
        report["wall_seconds"] = round(time.perf_counter() - start, 2)
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=1))
        _plot(report, tmp / REPORT_PNG)
        if output.exists():
            raise ConfigError("output", str(output), "allowed: a directory that does not exist yet "
                              "(it appeared during the run)")
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(table(report))
    print(json.dumps(report))
    return report


def _perplexity(model: Any, windows: Any, device: str) -> float | None:
    """Held-out perplexity on ``device``; the model goes back to the CPU afterwards (blocks onload one by one)."""
    from prunekit.oneshot.evaluate import perplexity

    if windows is None:
        return None
    try:
        return perplexity(model.to(device), windows, device=device, progress=True)
    finally:
        model.to("cpu")


def _reload_check(model: Any, path: Path) -> str:
    """``from_pretrained`` when plain transformers rebuilds the same model, else ``prunekit.load_slimmed``."""
    import torch
    import transformers

    ids = torch.arange(8).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        want = model(input_ids=ids).logits
    try:
        again = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            got = again(input_ids=ids).logits
        if got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=1e-4, rtol=1e-3):
            return "from_pretrained"
    except Exception:  # noqa: BLE001 - any failure means the plain loader cannot rebuild these shapes
        pass
    return "prunekit.load_slimmed"


def table(report: dict[str, Any]) -> str:
    """The human summary of a structured run."""
    widths, heads = report["ffn_widths"], report["heads"]

    def spread(values: list[Any]) -> str:
        vals = [v for v in values if v is not None]
        return "-" if not vals else str(vals[0]) if len(set(vals)) == 1 else f"{min(vals)}..{max(vals)}"

    lines = [
        f"structured pruning ({report['method']}, compensation {report['compensation'] or 'none'})",
        f"  parameters        {report['params_before']:>14,} -> {report['params_after']:,}",
        f"  decoder params    {report['decoder_params_before']:>14,} -> {report['decoder_params_after']:,} "
        f"({100 * report['decoder_fraction_kept']:.1f} % kept)",
        f"  layers            {len(report['block_influence']):>14} -> {len(widths)} "
        f"(dropped {report['dropped_layers']})",
        f"  FFN width         {spread(widths):>14}",
        f"  heads (kv)        {spread(heads):>14} ({spread(report['kv_heads'])})",
        f"  FLOP-ideal speed-up at {LATENCY_TOKENS} tokens: {report['flop_ideal_speedup']:.3f}x",
    ]
    if report["perplexity_before"] is not None:
        lines.append(f"  perplexity        {report['perplexity_before']:>14.3f} -> {report['perplexity_after']:.3f}")
    lines.append(f"  loads with {report['loads_with']}; wall {report['wall_seconds']} s "
                 f"(calibration {report['calibration_seconds']} s)")
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; JSON and table always come
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    a.bar(range(len(report["ffn_widths"])), [w or 0 for w in report["ffn_widths"]])
    a.set(title="FFN width per kept layer", xlabel="layer (after dropping)", ylabel="channels")
    b.bar(range(len(report["block_influence"])), report["block_influence"],
          color=["tab:red" if i in report["dropped_layers"] else "tab:blue"
                 for i in range(len(report["block_influence"]))])
    b.set(title="block influence (red: dropped)", xlabel="original layer", ylabel="1 - cos(in, out)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m prunekit.oneshot.structured``)."""
    args = build_parser().parse_args(argv)
    return run_structured(args)
