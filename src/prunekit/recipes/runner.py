"""The recipe run shared by GLUE and SQuAD: validate everything, train (dense or pruning, with or without
distillation) with the one shared loop, evaluate, and write the outputs.

Order matters for "nothing overwritten": every input is checked (flags, pruning config, data, model, the pruning
setup on the model) before anything is written to ``--output_dir``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from prunekit.recipes import checkpoint as ckpt_mod
from prunekit.recipes import outputs as out_mod
from prunekit.recipes.common import RecipeError, check_model_source, default_data_dir, resolve_model_path, set_seed
from prunekit.recipes import slimming as slim_step
from prunekit.recipes.prune_config import build_pruning_config, describe
from prunekit.recipes.steps import StepPlan, plan_steps
from prunekit.recipes.train import (
    DistEnv, build_optimizer, build_scheduler, setup_distributed, timed, train_dataloader, train_loop, unwrap,
    wrap_ddp,
)

logger = logging.getLogger("prunekit.recipes")


@dataclass
class TaskSetup:
    """What a task (GLUE or SQuAD) hands the shared run."""

    name: str  # e.g. "glue/sst2", "squad"
    model_class: Any  # an AutoModelFor... class
    model_kwargs: dict
    primary_metric: str
    train_dataset: Any
    train_collate: Callable
    task_loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    # distill_loss(student, teacher, batch) -> loss; teacher outputs are computed inside under no_grad
    distill_loss: Callable[[torch.nn.Module, torch.nn.Module, dict], torch.Tensor]
    evaluate: Callable[[torch.nn.Module, DistEnv], dict]
    # params without gradient under the distillation loss (GLUE hidden-state MSE leaves the head unused)
    distill_leaves_params_unused: bool = False
    pruning_start_offset: int = 0
    info: dict = field(default_factory=dict)


def _dry_plan() -> StepPlan:
    return StepPlan(100, 1, 10.0, 10, 100, True, 10, 80, 10)


def _check_values(args) -> None:
    if args.target_sparsity is not None and not 0.0 <= args.target_sparsity < 1.0:
        raise RecipeError(f"--target_sparsity: got {args.target_sparsity}; must be in [0, 1)")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(args, flag) < 1:
            raise RecipeError(f"--{flag}: got {getattr(args, flag)}; must be >= 1")
    if args.learning_rate <= 0:
        raise RecipeError(f"--learning_rate: got {args.learning_rate}; must be > 0")
    if args.distill_loss_weight < 0:
        raise RecipeError(f"--distill_loss_weight: got {args.distill_loss_weight}; must be >= 0")
    for flag in ("max_train_samples", "max_eval_samples", "max_train_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise RecipeError(f"--{flag}: got {value}; must be >= 1")
    if args.pruning_config and not Path(args.pruning_config).expanduser().is_file():
        raise RecipeError(f"--pruning_config: file {args.pruning_config!r} does not exist")
    ckpt_mod.parse_every(args.checkpointing_steps)
    if args.resume_from_checkpoint is not None and not args.resume_from_checkpoint.strip():
        raise RecipeError("--resume_from_checkpoint: got ''; give a checkpoint-<step> folder or 'latest'")
    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        raise RecipeError(f"--data_dir: {args.data_dir!r} is not a folder")
    if args.do_prune and not args.max_train_steps and \
            args.sparsity_warm_epochs + args.cooldown_epochs > args.num_train_epochs:
        raise RecipeError(f"--sparsity_warm_epochs ({args.sparsity_warm_epochs}) + --cooldown_epochs "
                          f"({args.cooldown_epochs}) exceed --num_train_epochs ({args.num_train_epochs}): pruning "
                          "would end before it starts")
    if not args.do_prune:
        ignored = [f for f in ("target_sparsity", "pruning_pattern", "pruning_config") if getattr(args, f)]
        if ignored:
            logger.warning("without --do_prune this is a dense fine-tune: %s ignored",
                           ", ".join("--" + f for f in ignored))


def _load_model(cls, path: str, args, env: DistEnv, **kwargs):
    try:
        model = cls.from_pretrained(path, trust_remote_code=args.trust_remote_code, dtype=torch.float32, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"cannot load model {path!r}: {first}") from exc
    return model.to(env.device)


def run_recipe(args, make_task: Callable[[Any, Any, DistEnv], TaskSetup]) -> dict:
    """Run one recipe; returns the metrics dict that is also written to ``metrics.json``."""
    t_start = time.perf_counter()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    env = setup_distributed(args.cpu)
    log = out_mod.RunLog(is_main=env.is_main)
    try:
        return _run(args, make_task, env, log, t_start)
    finally:
        log.close()
        env.close()


def _run(args, make_task, env: DistEnv, log: out_mod.RunLog, t_start: float) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _check_values(args)
    out_dir = out_mod.check_output_dir(args.output_dir, args.overwrite_output_dir,
                                       resuming=bool(args.resume_from_checkpoint))
    every = ckpt_mod.parse_every(args.checkpointing_steps)
    resumed = None  # read (weights_only) and checked in full before anything is created
    if args.resume_from_checkpoint:
        resumed = ckpt_mod.read(ckpt_mod.resolve(args.resume_from_checkpoint, out_dir), env.rank)
        ckpt_mod.check_identity(resumed, ckpt_mod.run_identity(args, env.world_size))  # flags: before any data
    slim_step.check_args(args)
    if args.do_prune and not args.auto_slim:
        build_pruning_config(args, _dry_plan())  # a pattern / target / key that cannot work fails now
    args.data_dir = args.data_dir or default_data_dir()
    model_path = resolve_model_path(args.model_name_or_path)
    check_model_source(model_path)
    teacher_path = None
    if args.distill_loss_weight > 0:
        teacher_path = resolve_model_path(args.teacher_model_name_or_path or args.model_name_or_path)
        check_model_source(teacher_path)
    tok_path = resolve_model_path(args.tokenizer_name) if args.tokenizer_name else model_path
    out_mod.check_outside_inputs(out_dir, {
        "--model_name_or_path": model_path, "--tokenizer_name": tok_path, "--teacher_model_name_or_path": teacher_path,
        "--data_dir": args.data_dir, "--pruning_config": args.pruning_config,
        "--train_file": getattr(args, "train_file", None), "--validation_file": getattr(args, "validation_file", None)})
    set_seed(args.seed)

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, use_fast=not args.use_slow_tokenizer,
                                                  trust_remote_code=args.trust_remote_code)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"cannot load the tokenizer of {tok_path!r}: {first}") from exc

    task = make_task(args, tokenizer, env)
    n_train = len(task.train_dataset)
    plan_kw = dict(world_size=env.world_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
                   do_prune=args.do_prune, sparsity_warm_epochs=args.sparsity_warm_epochs,
                   cooldown_epochs=args.cooldown_epochs, pruning_frequency=args.pruning_frequency,
                   start_offset=task.pruning_start_offset)
    epochs = args.num_train_epochs
    plan = plan_steps(n_train, args.per_device_train_batch_size, epochs, **plan_kw)
    if args.max_train_steps:
        epochs = args.max_train_steps / plan.steps_per_epoch
        plan = plan_steps(n_train, args.per_device_train_batch_size, epochs, **plan_kw)
    config = build_pruning_config(args, plan) if args.do_prune and not args.auto_slim else None

    model = _load_model(task.model_class, model_path, args, env, **task.model_kwargs)
    if args.auto_slim:  # the structures come from the model's dataflow
        config = slim_step.auto_slim_config(args, plan, model)
    identity = ckpt_mod.run_identity(args, env.world_size, task.name, plan.to_dict(),
                                     describe(config) if config is not None else None)
    if resumed is not None:
        ckpt_mod.check_identity(resumed, identity)
    teacher = None
    if teacher_path is not None:
        teacher = _load_model(task.model_class, teacher_path, args, env, **task.model_kwargs)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    logger.info("task %s: %d training examples (%d features), model %s, %d process(es) on %s", task.name,
                task.info.get("train_examples", n_train), n_train, args.model_name_or_path, env.world_size,
                env.device)
    logger.info("steps: %d per epoch, %d in all (%.2f epochs, total batch %d)", plan.steps_per_epoch,
                plan.total_steps, epochs, plan.total_batch_size)
    if plan.do_prune:
        events = (plan.end_step - plan.start_step) // plan.pruning_frequency + 1
        logger.info("pruning: steps %d..%d every %d (%d events)", plan.start_step, plan.end_step,
                    plan.pruning_frequency, events)

    metrics: dict[str, Any] = {"task": task.name, "model": args.model_name_or_path,
                               "mode": "prune" if args.do_prune else "dense",
                               "distillation": None, "primary_metric": task.primary_metric}
    eval_time = 0.0
    dense_metrics = None
    if resumed is not None:  # the model is no longer the starting checkpoint: its metrics were saved
        dense_metrics = resumed.state.get("dense_metrics")
    elif args.do_prune and not args.skip_dense_eval:
        dense_metrics, dt = timed(task.evaluate, model, env)
        eval_time += dt
        logger.info("dense (starting checkpoint) %s", _fmt(dense_metrics))

    betas = (0.9, 0.9) if args.do_prune else (0.9, 0.999)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, betas=betas,
                                fused=False if args.no_fused_adamw else None)
    pruning = None
    if config is not None:
        import prunekit

        pruning = prunekit.prepare_pruning(model, config, optimizer)
    scheduler = build_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, plan.total_steps)
    if resumed is not None:
        ckpt_mod.restore(resumed, model, optimizer, scheduler, pruning)
        logger.info("resuming from %s (step %d of %d)", resumed.path, resumed.step, plan.total_steps)
    distill = teacher is not None
    ddp_model = wrap_ddp(model, env, find_unused_parameters=distill and task.distill_leaves_params_unused)

    if distill:
        metrics["distillation"] = {"weight": args.distill_loss_weight,
                                   "teacher": args.teacher_model_name_or_path or args.model_name_or_path,
                                   **task.info.get("distillation", {})}

        def compute_loss(m, batch):
            return task.distill_loss(m, teacher, batch)
    else:
        compute_loss = task.task_loss

    # Everything is checked: from here on the output folder is written.
    if env.is_main:
        out_mod.prepare_output_dir(out_dir, args.overwrite_output_dir, resuming=resumed is not None)
        log.attach(out_dir, append=resumed is not None)
        out_mod.write_json(out_dir / "run_args.json", {
            "args": vars(args), "plan": plan.to_dict(),
            "resumed_from": str(resumed.path) if resumed is not None else None,
            "pruning_config": describe(config) if config is not None else None,
            "versions": _versions(), "world_size": env.world_size, "device": str(env.device)})
    env.barrier()

    loader = train_dataloader(task.train_dataset, args.per_device_train_batch_size, task.train_collate, env,
                              args.seed)
    checkpointer = None
    if every is not None:
        checkpointer = ckpt_mod.Checkpointer(out_dir, every, env, model, optimizer, scheduler, pruning, identity,
                                             extra={"dense_metrics": dense_metrics})
    result = train_loop(ddp_model, loader, optimizer, compute_loss, total_steps=plan.total_steps, env=env,
                        lr_scheduler=scheduler, pruning=pruning,
                        gradient_accumulation_steps=args.gradient_accumulation_steps,
                        max_grad_norm=args.max_grad_norm, progress=not args.disable_tqdm,
                        desc="prune" if pruning is not None else "fine-tune",
                        resume=ckpt_mod.position(resumed) if resumed is not None else None, on_step=checkpointer)
    logger.info("trained %d steps in %.1f s (%.1f samples/s)", result.global_step, result.train_time_s,
                result.samples_per_s)

    import prunekit

    if pruning is not None:
        pruning.on_train_end(print_report=False)
    report = prunekit.sparsity_report(model, pruning)
    if env.is_main:
        logger.info("sparsity report\n%s", report.table())

    in_sync = _ranks_in_sync(model, env)
    final_metrics, dt = timed(task.evaluate, model, env)
    eval_time += dt
    logger.info("final %s", _fmt(final_metrics))
    key = task.primary_metric
    dense_for_change = dense_metrics if args.do_prune else final_metrics
    metrics.update({
        "dense": dense_metrics if args.do_prune else final_metrics,
        "final": final_metrics,
        "dense_metric": (dense_for_change or {}).get(key),
        "final_metric": final_metrics.get(key),
        "relative_change": out_mod.relative_change((dense_for_change or {}).get(key), final_metrics.get(key))
        if args.do_prune else None,
        "sparsity": {
            "target": (config_target(config) if config is not None else 0.0),
            "pruned_layers": getattr(report, "pruned_layers_sparsity", None),
            "linear_conv": getattr(report, "linear_conv_sparsity", None),
            "all_params": getattr(report, "all_params_sparsity", None),
        },
        "steps": plan.to_dict() | {"done": result.global_step},
        "time": {"train_s": result.train_time_s, "eval_s": eval_time,
                 "total_s": time.perf_counter() - t_start, "train_samples_per_s": result.samples_per_s},
        "world_size": env.world_size,
        "device": str(env.device),
    })
    if resumed is not None:
        metrics["resumed_from"] = {"checkpoint": str(resumed.path), "step": resumed.step}
    if checkpointer is not None:
        metrics["checkpoints"] = [p.name for p in checkpointer.saved]
    if in_sync is not None:
        metrics["ddp_ranks_in_sync"] = in_sync
    if args.auto_slim:
        sample = task.train_collate([task.train_dataset[i] for i in
                                     range(min(args.per_device_eval_batch_size, len(task.train_dataset)))])
        sample = {k: v.to(env.device) for k, v in sample.items() if isinstance(v, torch.Tensor)}
        pruning_state = pruning.state_dict()  # the masks as trained, before the model changes shape
        slimmed = slim_step.slim_and_time(model, pruning, sample)
        after_metrics, dt = timed(task.evaluate, model, env)
        eval_time += dt
        slimmed["final_after_slim"] = after_metrics
        metrics["slim"] = slimmed
        metrics["time"]["eval_s"] = eval_time
        logger.info("slimmed\n%s\nlatency %.1f ms -> %.1f ms (%.2fx), %s after slimming",
                    slimmed.pop("table"), 1e3 * slimmed["latency_before_s"], 1e3 * slimmed["latency_after_s"],
                    slimmed["speedup"], _fmt(after_metrics))

    if env.is_main:
        if args.auto_slim:  # per-layer widths differ: save with the shapes so load_slimmed can rebuild them
            from prunekit.slimming import save_slimmed

            save_slimmed(model, out_dir)
            tokenizer.save_pretrained(out_dir)
        else:
            out_mod.save_model(model, tokenizer, out_dir)
        if pruning is not None:
            torch.save(pruning_state if args.auto_slim else pruning.state_dict(), out_dir / "pruning_state.pt")
        out_mod.write_json(out_dir / "sparsity_report.json", out_mod.report_dict(report))
        out_mod.write_json(out_dir / "history.json", result.history)
        out_mod.plot_report(out_dir / "sparsity_report.png", report, result.history,
                            title=f"{task.name} {args.model_name_or_path}",
                            target=metrics["sparsity"]["target"] if pruning is not None else None)
        out_mod.write_json(out_dir / "metrics.json", metrics)
        logger.info("wrote %s", out_dir)
    env.barrier()
    return metrics


def _ranks_in_sync(model, env: DistEnv) -> bool | None:
    """Under DDP: whether every process ends with the same weights (zeros included); None on one process."""
    if not env.distributed:
        return None
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        for p in unwrap(model).parameters():
            total[0] += p.double().sum()
            total[1] += (p == 0).sum()
    gathered = [torch.zeros_like(total) for _ in range(env.world_size)]
    torch.distributed.all_gather(gathered, total)
    ok = all(torch.allclose(g, gathered[0], rtol=1e-9, atol=1e-6) for g in gathered)
    if not ok:
        logger.warning("processes ended with different weights: %s", [g.tolist() for g in gathered])
    return ok


def config_target(config) -> float | None:
    for attr in ("target_sparsity",):
        if hasattr(config, attr):
            return getattr(config, attr)
    pruners = getattr(config, "pruners", None) or getattr(config, "pruning_configs", None) or []
    for pruner in pruners:
        value = getattr(pruner, "target_sparsity", None)
        if value is not None:
            return value
    return None


def _fmt(metrics: dict | None) -> str:
    if not metrics:
        return "{}"
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _versions() -> dict:
    import transformers

    try:
        from importlib.metadata import version

        pk = version("prunekit")
    except Exception:  # noqa: BLE001
        pk = "unknown"
    return {"prunekit": pk, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
