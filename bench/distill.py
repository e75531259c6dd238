"""Recovery of a structurally pruned SmolLM2-135M by ``prunekit distill``, killed midway and resumed.

Protocol (issue 12, "Recovery"): the student is SmolLM2 with 33 % of every layer's FFN channels removed by weight
norm (‖down_proj column‖ · (‖gate row‖ + ‖up row‖), the lowest go; widths stay a multiple of 32) through
``prunekit.slim`` — the plain one-shot structured baseline, no calibration. ``prunekit distill`` then trains it
on the Wikipedia paragraphs of SQuAD dev articles 1-38 with a fixed token budget; held-out perplexity is measured
on articles 39-48 (16 consecutive windows of 512 tokens) for the dense teacher, the one-shot student and the
recovered one. The main run is SIGKILLed right after its checkpoint at ``--kill-at-step`` and restarted with
``--resume``. A second, small check trains the real student for two steps uninterrupted and, separately, one
step + stop + ``--resume``, and compares the saved weights bit for bit.

    python bench/distill.py --work /tmp/distill-bench                  # the issue's protocol (slow on 2 CPUs)
    python bench/distill.py --work /tmp/d --max-tokens 4096 --kill-at-step 2

Prints one JSON object (also written to ``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import transformers
from prunekit.oneshot.data import HELD_OUT_ARTICLES, CALIBRATION_ARTICLES, squad_paragraphs
from prunekit.slimming import detect, save_slimmed, slim
from prunekit.slimming.layers import layer_ops

transformers.logging.set_verbosity_error()

SMOLLM2 = Path(os.environ.get("PRUNEKIT_SMOLLM2_DIR", Path.home() / ".cache" / "prunekit-models" / "smollm2-135m"))
DATA = Path(os.environ.get("PRUNEKIT_DATA_DIR", "/work/shared/data"))


def weight_norm_student(model, sparsity: float, multiple: int = 32) -> dict:
    """Zero the lowest-norm ``sparsity`` of every FFN's channels (keeping a multiple of ``multiple``), then slim."""
    detection = detect(model)
    widths = []
    with torch.no_grad():
        for group in detection.ffn:
            consumer = model.get_submodule(group.consumer)
            ops = layer_ops(consumer)
            producers = [model.get_submodule(n) for n in group.producers]
            score = ops.weight_2d(consumer).norm(dim=0) * sum(
                layer_ops(m).weight_2d(m).norm(dim=1) for m in producers)
            keep = max(multiple, int(group.width * (1 - sparsity)) // multiple * multiple)
            drop = score.argsort()[: group.width - keep]
            consumer.weight.index_fill_(ops.in_dim, drop, 0.0)
            for producer in producers:
                layer_ops(producer).weight_2d(producer)[drop] = 0.0
            widths.append(keep)
    slim(model, round_to=multiple)
    return {"ffn_widths": sorted(set(widths)), "groups": len(detection.ffn)}


def decoder_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def distill_cmd(args, student: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prunekit.cli", "distill", "--student", str(student), "--teacher", str(args.model),
            "--train-text", str(args.work / "train.jsonl"), "--output", str(out), "--device", "cpu",
            "--no-progress", *extra]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def kill_after_checkpoint(cmd: list[str], out: Path, step: int) -> tuple[float, int]:
    """Start ``cmd``, SIGKILL it as soon as its log reports the checkpoint of ``step``; wall seconds, rc."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    marker = f"step {step}/"
    while proc.poll() is None:
        log = out / "train.log"
        if log.exists() and any(marker in line and "checkpoint" in line for line in log.read_text().splitlines()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(2)
    return time.perf_counter() - t0, proc.wait()


def exact_resume_check(args, student: Path) -> dict:
    """Two steps uninterrupted vs one step, stop, --resume: the saved weights must be equal bit for bit."""
    from safetensors.torch import load_file

    common = ["--max-tokens", "256", "--seqlen", "64", "--batch-size", "2", "--lr", str(args.lr),
              "--checkpoint-every", "0"]
    whole, parts = args.work / "exact_whole", args.work / "exact_parts"
    run(distill_cmd(args, student, whole, *common))
    run(distill_cmd(args, student, parts, *common, "--stop-after-steps", "1"))
    run(distill_cmd(args, student, parts, *common, "--resume"))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    return {"tokens": 256, "steps": 2, "identical": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=SMOLLM2)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (student, runs)")
    p.add_argument("--ffn-sparsity", type=float, default=0.33)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kill-at-step", type=int, default=16, help="SIGKILL after this step's checkpoint (0: no kill)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=8, help="steps between held-out evaluations")
    p.add_argument("--skip-exact-check", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    squad = DATA / "squad" / "dev-v1.1.json"
    write_jsonl(args.work / "train.jsonl", squad_paragraphs(squad, CALIBRATION_ARTICLES))
    write_jsonl(args.work / "eval.jsonl", squad_paragraphs(squad, HELD_OUT_ARTICLES))

    student_dir = args.work / "student"
    dense = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dense_decoder = decoder_params(dense)
    if not (student_dir / "model.safetensors").exists():
        t0 = time.perf_counter()
        cut = weight_norm_student(dense, args.ffn_sparsity)
        save_slimmed(dense, student_dir)
        transformers.AutoTokenizer.from_pretrained(args.model).save_pretrained(student_dir)
        cut["seconds"] = time.perf_counter() - t0
    else:
        cut = {"reused": True}
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    cut["decoder_params_fraction"] = decoder_params(student) / dense_decoder
    del dense, student

    result: dict = {"protocol": {"student": f"SmolLM2-135M, {args.ffn_sparsity:.0%} FFN channels removed by weight "
                                 "norm (multiple of 32), prunekit.slim", "train": "SQuAD dev articles 1-38",
                                 "eval": f"articles 39-48, {args.eval_windows} x {args.eval_seqlen} tokens"},
                    "student": cut}
    if not args.skip_exact_check:
        result["exact_resume_real_model"] = exact_resume_check(args, student_dir)
        print(json.dumps(result["exact_resume_real_model"]), flush=True)

    out = args.work / "recovered"
    flags = ["--max-tokens", str(args.max_tokens), "--seqlen", str(args.seqlen), "--batch-size",
             str(args.batch_size), "--grad-accum", str(args.grad_accum), "--lr", str(args.lr), "--temperature",
             str(args.temperature), "--eval-text", str(args.work / "eval.jsonl"), "--eval-windows",
             str(args.eval_windows), "--eval-seqlen", str(args.eval_seqlen), "--eval-every", str(args.eval_every)]
    wall = 0.0
    if args.kill_at_step:
        flags += ["--checkpoint-every", str(args.kill_at_step)]
        killed_s, rc = kill_after_checkpoint(distill_cmd(args, student_dir, out, *flags), out, args.kill_at_step)
        result["killed"] = {"after_step": args.kill_at_step, "rc": rc, "seconds": killed_s}
        wall += killed_s
        wall += run(distill_cmd(args, student_dir, out, *flags, "--resume"))
    else:
        wall += run(distill_cmd(args, student_dir, out, *flags))
    metrics = json.loads((out / "metrics.json").read_text())
    result.update({"perplexity": metrics["perplexity"], "evals": json.loads((out / "history.json").read_text())["eval"], "tokens": metrics["tokens"], "steps": metrics["steps"],
                   "resumed_at_steps": metrics["resumed_at_steps"], "train_tokens_per_s": metrics["time"]["tokens_per_s"],
                   "wall_s": wall, "config": {k: metrics["config"][k] for k in (
                       "max_tokens", "seqlen", "batch_size", "grad_accum", "lr", "lr_scheduler", "temperature",
                       "hidden_weight", "windows", "seed", "dtype")},
                   "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                               "torch": torch.__version__, "transformers": transformers.__version__}})
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
