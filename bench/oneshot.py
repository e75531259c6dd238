"""One-shot LLM pruning, prunekit vs llm-compressor 0.14, side by side in one run (issue 11).

Same model, same calibration windows, same evaluator. For each cell (method x pattern) the two tools run as
separate processes, interleaved (prunekit, then the peer) so both see the same load on the machine; each
process's whole wall time and peak RSS are measured from outside (GNU time, see run_measured), and every pruned
model is then reloaded with plain transformers and scored here by bench/llm_common.py: held-out perplexity, exact sparsity of every decoder Linear, the 2:4 check (every 4-group of
a row holds >= 2 zeros) and whether lm_head stayed as it was.

    bash bench/setup_peers.sh                                  # once: the peer venv /work/bench-venv
    python bench/oneshot.py                                    # every cell, both tools, SmolLM2-135M, 64 x 512
    python bench/oneshot.py --skip-prunekit --cells sparsegpt-1x1 wanda-2:4
    python bench/oneshot.py --nsamples 8 --seqlen 128 --eval-windows 4 --model TINY_DIR   # smoke run
    python bench/oneshot.py --cells wanda-2:4 --seeds 0 1 2 3 4    # paired runs over 5 calibration draws

With several ``--seeds`` every cell runs once per seed (its own calibration windows, the same for both tools), and
the ratios are also summarised over the seeds: a single draw of 64 windows moves a tool's perplexity by a few
per cent through float-level near-ties, so one seed cannot tell two implementations of the same algorithm apart.

Writes into --output (a new directory): calibration-seed<S>.pt, logs/, results.json, results.md, perplexity.png;
the pruned models are deleted after scoring unless --keep-models. Prints the JSON document, then the markdown
table.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_common  # noqa: E402  (bench/ is not a package)

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = os.environ.get("PRUNEKIT_SMOLLM2_DIR") or str(Path.home() / ".cache/prunekit-models/smollm2-135m")
DEFAULT_PEER_PYTHON = "/work/bench-venv/bin/python"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One comparison: a method and a pattern at the target sparsity; ``peer`` says llm-compressor has it too."""

    method: str
    pattern: str
    peer: bool

    @property
    def name(self) -> str:
        return f"{self.method}-{self.pattern}"

    @property
    def slug(self) -> str:  # for file names
        return self.name.replace(":", "of")

    @property
    def nm(self) -> tuple[int, int] | None:
        if ":" not in self.pattern:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


CELLS = {c.name: c for c in (
    Cell("sparsegpt", "1x1", peer=True),
    Cell("sparsegpt", "2:4", peer=True),
    Cell("wanda", "2:4", peer=True),
    Cell("magnitude", "1x1", peer=False),  # baseline, prunekit only (llm-compressor's magnitude modifier is GMP)
    Cell("magnitude", "2:4", peer=False),
)}
TOOLS = ("prunekit", "llm-compressor")


def parse_cells(names: Sequence[str]) -> list[Cell]:
    """Cells by name, in the order given; an unknown name is a one-line error listing the valid ones."""
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        raise ValueError(f"--cells: got {unknown}; allowed {sorted(CELLS)}")
    return [CELLS[n] for n in dict.fromkeys(names)]


def prepare_windows(tokenizer: Any, nsamples: int, seqlen: int, eval_count: int, seeds: Sequence[int],
                    squad: dict | str | os.PathLike | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The bench protocol's token windows: {seed: calibration [nsamples, seqlen]}, evaluation [eval_count, seqlen].

    The text is tokenized once; each seed only draws its own window starts.
    """
    calib_ids = llm_common.tokenize(llm_common.wiki_text("calibration", squad), tokenizer)
    held_ids = llm_common.tokenize(llm_common.wiki_text("heldout", squad), tokenizer)
    return ({seed: llm_common.calibration_windows(calib_ids, nsamples, seqlen, seed) for seed in seeds},
            llm_common.eval_windows(held_ids, seqlen, eval_count))


def last_json_line(text: str) -> dict | None:
    """The last stdout line that parses as a JSON object (the runners' own record), or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


GNU_TIME = "/usr/bin/time"


def run_measured(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion; its wall time, peak RSS (MiB) and exit code, its output to ``log_path``.

    Peak RSS comes from GNU time (``%M``) when /usr/bin/time exists: a child that this big Python process spawns
    directly inherits the parent's high-water RSS at exec (Linux carries it over), so ``wait4`` on it would
    report at least this process's own peak. GNU time is small and forks the command itself. Without it, the
    child's RSS is polled every 50 ms (a lower bound).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_path.with_suffix(".maxrss")
    use_time = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if use_time else list(cmd)
    peak_kib = 0
    with open(log_path, "w") as log:
        start = time.perf_counter()
        # own process group: an interrupted bench stops the tool too, not only GNU time
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if use_time:
                proc.wait()
            else:
                import psutil

                child = psutil.Process(proc.pid)
                while proc.poll() is None:
                    try:
                        peak_kib = max(peak_kib, child.memory_info().rss // 1024)
                    except psutil.Error:
                        pass
                    time.sleep(0.05)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        wall = time.perf_counter() - start
    if use_time:
        lines = rss_file.read_text().split() if rss_file.exists() else []
        peak_kib = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    text = log_path.read_text(errors="replace")
    if use_time and text.rstrip().splitlines()[-1:] and "exited with non-zero status" in text.rstrip().splitlines()[-1]:
        text = "\n".join(text.rstrip().splitlines()[:-1])
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mib": peak_kib / 1024,
            "rss_source": "GNU time %M" if use_time else "psutil poll 50 ms",
            "record": last_json_line(text), "log": str(log_path),
            "log_tail": None if proc.returncode == 0 else text[-2000:]}


def tool_command(tool: str, cell: Cell, args: argparse.Namespace, calibration: Path, out: Path,
                 seed: int = 0) -> list[str]:
    """The command line that prunes ``cell`` with ``tool`` into ``out`` (``seed``: prunekit's torch seed)."""
    common = ["--model", args.model, "--calibration", str(calibration), "--method", cell.method,
              "--pattern", cell.pattern, "--sparsity", str(args.sparsity), "--block-size", str(args.block_size),
              "--dampening", str(args.dampening), "--output", str(out)]
    if tool == "prunekit":
        return [sys.executable, str(HERE / "prunekit_oneshot_run.py"), *common, "--seed", str(seed)]
    return [args.peer_python, str(HERE / "llmc_oneshot.py"), *common]


def evaluate(model_dir: str | os.PathLike, windows: torch.Tensor, cell: Cell | None) -> dict[str, Any]:
    """Reload ``model_dir`` with plain transformers and score it: perplexity, sparsity, N:M check."""
    start = time.perf_counter()
    model = llm_common.load_causal_lm(model_dir)
    n, m = (cell.nm if cell and cell.nm else (2, 4))
    stats = llm_common.sparsity_stats(model, n, m)
    ppl = llm_common.perplexity(model, windows)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    del model
    gc.collect()
    return {"perplexity": ppl, **stats, "plain_config": "quantization_config" not in config,
            "eval_s": time.perf_counter() - start}


RATIO_KEYS = ("perplexity", "wall_s", "peak_rss_mib")


def compare(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """prunekit / llm-compressor ratios per cell for perplexity, wall time and peak RSS (< 1: prunekit better).

    Runs pair up by (cell, seed). A cell's ratios are the geometric means over its paired seeds;
    ``per_seed`` holds each seed's own ratios and ``perplexity_wins`` counts the seeds where prunekit's
    perplexity is at most the peer's.
    """
    out: dict[str, dict[str, Any]] = {}
    by = {(r["cell"], r["seed"], r["tool"]): r for r in runs if r.get("rc") == 0 and "perplexity" in r}
    for cell in dict.fromkeys(r["cell"] for r in runs):
        per_seed = {}
        for seed in dict.fromkeys(r["seed"] for r in runs if r["cell"] == cell):
            ours, peer = by.get((cell, seed, "prunekit")), by.get((cell, seed, "llm-compressor"))
            if ours and peer:
                per_seed[seed] = {k: ours[k] / peer[k] for k in RATIO_KEYS}
        if per_seed:
            n = len(per_seed)
            out[cell] = {k: math.exp(sum(math.log(r[k]) for r in per_seed.values()) / n) for k in RATIO_KEYS}
            out[cell].update(seeds=n, perplexity_wins=sum(r["perplexity"] <= 1.0 for r in per_seed.values()),
                             per_seed=per_seed)
    return out


def ratio_table(ratios: dict[str, dict[str, Any]]) -> str:
    """The summary of :func:`compare`: one row per cell, geometric-mean ratios over the paired seeds ("" if none)."""
    if not ratios:
        return ""
    lines = ["| cell | paired seeds | perplexity ratio (geo. mean) | seeds with ppl <= peer | per-seed ppl ratios "
             "| wall ratio | RSS ratio |", "|---|---|---|---|---|---|---|"]
    for cell, r in ratios.items():
        seeds = ", ".join(f"{s}: {v['perplexity']:.4f}" for s, v in r["per_seed"].items())
        lines.append(f"| {cell} | {r['seeds']} | {r['perplexity']:.4f} | {r['perplexity_wins']} / {r['seeds']} "
                     f"| {seeds} | {r['wall_s']:.3f} | {r['peak_rss_mib']:.3f} |")
    return "\n".join(lines)


def markdown_table(runs: list[dict[str, Any]], dense_ppl: float | None) -> str:
    """One row per (cell, seed, tool): perplexity, sparsity, N:M check, whole-process wall time and peak RSS."""
    lines = ["| cell | seed | tool | perplexity | vs dense | sparsity | N:M groups short | wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    if dense_ppl is not None:
        lines.append(f"| dense | – | – | {dense_ppl:.3f} | 1.000 | – | – | – | – |")
    for r in runs:
        if r.get("rc") != 0 or "perplexity" not in r:
            lines.append(f"| {r['cell']} | {r['seed']} | {r['tool']} | failed (rc {r.get('rc')}, see "
                         f"{r.get('log')}) | – | – | – | – | – |")
            continue
        ratio = f"{r['perplexity'] / dense_ppl:.3f}" if dense_ppl else "–"
        short = next((v for k, v in r.items() if k.startswith("groups_below_")), None)
        nm = str(short) if CELLS.get(r["cell"]) and CELLS[r["cell"]].nm else "–"
        lines.append(f"| {r['cell']} | {r['seed']} | {r['tool']} | {r['perplexity']:.3f} | {ratio} "
                     f"| {r['sparsity']:.4f} | {nm} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], dense_ppl: float | None, path: Path) -> bool:
    """Grouped bars of perplexity per cell, one colour per tool, dense as a line; False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r["cell"], r["seed"]) for r in runs))
    several = len({seed for _, seed in groups}) > 1
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 + 1.6 * len(groups)), 4))
    width = 0.38
    for k, tool in enumerate(TOOLS):
        xs, ys = [], []
        for i, (cell, seed) in enumerate(groups):
            r = next((r for r in runs if r["cell"] == cell and r["seed"] == seed and r["tool"] == tool
                      and "perplexity" in r), None)
            if r:
                xs.append(i + (k - 0.5) * width)
                ys.append(r["perplexity"])
        if xs:  # a tool that ran nothing gets no legend entry
            bars = ax.bar(xs, ys, width, label=tool, color=f"C{k}")
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="grey", linestyle="--", label=f"dense {dense_ppl:.1f}")
    ax.set_xticks(range(len(groups)), [f"{c}\nseed {s}" if several else c for c, s in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("one-shot pruning: same calibration windows and evaluator", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and the project venv's versions."""
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        mem = None
    import transformers

    return {"cpu": model, "nproc": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face causal-LM directory")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows scored")
    p.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="seeds of the calibration window starts: every cell runs once per seed, both tools on "
                        "that seed's windows")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity of the 1x1 cells")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT block (llm-compressor's default)")
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening (llm-compressor's default)")
    p.add_argument("--cells", nargs="+", default=[c for c in CELLS], metavar="CELL",
                   help=f"any of {list(CELLS)}")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the peer venv (bench/setup_peers.sh)")
    p.add_argument("--skip-peer", action="store_true", help="run prunekit only")
    p.add_argument("--skip-prunekit", action="store_true", help="run llm-compressor only")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of both tools' processes (default: inherit)")
    p.add_argument("--output", default=None, help="new directory for results (default runs/oneshot-<UTC time>)")
    p.add_argument("--keep-models", action="store_true", help="keep the pruned model directories")
    args = p.parse_args(argv)
    # every check before any work
    try:
        args.cell_list = parse_cells(args.cells)
    except ValueError as e:
        p.error(str(e))
    args.seeds = list(dict.fromkeys(args.seeds))
    if any(s < 0 for s in args.seeds):
        p.error(f"--seeds: got {args.seeds}; allowed integers >= 0")
    for key in ("nsamples", "seqlen", "eval_windows", "block_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: got {getattr(args, key)}; allowed >= 1")
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity: got {args.sparsity}; allowed 0 < sparsity < 1")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model: got {args.model!r}; allowed a Hugging Face model directory with config.json "
                "(set PRUNEKIT_SMOLLM2_DIR or build it with ../shared/models/build_smollm2.py)")
    if args.skip_peer and args.skip_prunekit:
        p.error("--skip-peer and --skip-prunekit together leave nothing to run")
    if not args.skip_peer and not Path(args.peer_python).is_file():
        p.error(f"--peer-python: got {args.peer_python!r}, which does not exist; run bash bench/setup_peers.sh "
                "or pass --skip-peer")
    if not args.skip_prunekit:
        from prunekit_oneshot_run import oneshot_function

        if oneshot_function() is None:
            p.error("prunekit.oneshot is not in this venv's prunekit yet; pass --skip-prunekit")
    if args.output is None:
        args.output = str(Path("runs") / datetime.now(timezone.utc).strftime("oneshot-%Y%m%d-%H%M%S"))
    if Path(args.output).exists() and any(Path(args.output).iterdir()):
        p.error(f"--output: got {args.output!r}, which exists and is not empty; give a new directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # a killed bench takes its running tool along (run_measured stops the tool's process group)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _bench(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bench(args: argparse.Namespace) -> int:
    """Prepare the windows, run and score every (cell, tool), write results; 0 if every run succeeded."""
    import transformers
    from tqdm import tqdm
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # one bar here: the runs

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibs, held = prepare_windows(tokenizer, args.nsamples, args.seqlen, args.eval_windows, args.seeds)
    calib_paths = {seed: out / f"calibration-seed{seed}.pt" for seed in calibs}
    for seed, calib in calibs.items():
        torch.save(calib, calib_paths[seed])
    (out / "models").mkdir()

    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    plan = [(seed, cell, tool) for seed in args.seeds for cell in args.cell_list for tool in TOOLS
            if not (tool == "prunekit" and args.skip_prunekit)
            and not (tool == "llm-compressor" and (args.skip_peer or not cell.peer))]

    runs: list[dict[str, Any]] = []
    dense: dict[str, Any] = {}

    def write(final: bool) -> dict[str, Any]:
        """results.json / results.md after every run, so an interrupted bench keeps what it measured."""
        dense_ppl = dense.get("perplexity")
        doc = {
            "bench": "oneshot",
            "complete": final,
            "protocol": {"model": args.model, "text": "SQuAD v1.1 dev Wikipedia paragraphs; calibration articles "
                         "1-38, held out 39-48, joined with a blank line", "nsamples": args.nsamples,
                         "seqlen": args.seqlen, "eval_windows": args.eval_windows, "seeds": args.seeds,
                         "dtype": "float32", "device": "cpu", "sparsity": args.sparsity,
                         "block_size": args.block_size, "dampening": args.dampening, "threads": args.threads,
                         "calibration_sha256": {str(s): hashlib.sha256(c.numpy().tobytes()).hexdigest()
                                                for s, c in calibs.items()}},
            "machine": machine_info(),
            "peer": next(({k: r["record"].get(k) for k in ("version", "torch", "transformers", "modifier",
                                                             "pipeline", "sequential_targets")}
                          for r in runs if r["tool"] == "llm-compressor" and r.get("record")), None),
            "dense": {k: v for k, v in dense.items() if k != "per_layer"},
            "ratios_prunekit_over_peer": compare(runs),
            "runs": runs,
        }
        doc["plot"] = str(out / "perplexity.png") if final and plot(runs, dense_ppl, out / "perplexity.png") else None
        (out / "results.json").write_text(json.dumps(doc, indent=1))
        summary = ratio_table(doc["ratios_prunekit_over_peer"])
        (out / "results.md").write_text(markdown_table(runs, dense_ppl) + "\n"
                                        + (f"\n{summary}\n" if summary else ""))
        return doc

    bar = tqdm(plan, desc="runs", unit="run", file=sys.stderr)
    for seed, cell, tool in bar:
        bar.set_postfix_str(f"{tool} {cell.name} seed {seed}")
        slug = f"{tool}-{cell.slug}-seed{seed}"
        model_out = out / "models" / slug
        cmd = tool_command(tool, cell, args, calib_paths[seed], model_out, seed)
        run = {"cell": cell.name, "seed": seed, "tool": tool, **run_measured(cmd, out / "logs" / f"{slug}.log", env)}
        if run["rc"] == 0:
            run.update(evaluate(model_out, held, cell))
            run["per_layer"] = run.pop("per_layer")  # keep the long dict last in the JSON
            if not args.keep_models:
                shutil.rmtree(model_out)
        runs.append(run)
        write(final=False)
        bar.write(f"{tool:15s} {cell.name:14s} seed={seed} rc={run['rc']} wall={run['wall_s']:.0f}s "
                  f"rss={run['peak_rss_mib']:.0f}MiB ppl={run.get('perplexity', float('nan')):.3f}")
    dense.update(evaluate(args.model, held, None))  # last: the tools' runs come first on a busy machine
    doc = write(final=True)
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"} | {"runs": [
        {k: v for k, v in r.items() if k != "per_layer"} for r in runs]}, indent=1))
    print(markdown_table(runs, dense.get("perplexity")))
    summary = ratio_table(doc["ratios_prunekit_over_peer"])
    if summary:
        print(f"\n{summary}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
