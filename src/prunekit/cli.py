"""Console commands: ``prunekit glue|squad|oneshot`` and the stand-alone ``prunekit-glue`` / ``prunekit-squad``.

The flags are the original INC example scripts' (``run_glue_no_trainer.py`` / ``run_qa_no_trainer.py``), so a
shell recipe runs by swapping the script name. Errors a user can fix are printed as one line and exit with
status 2; nothing in ``--output_dir`` is touched then.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

EXIT_USAGE = 2


def _fail(prog: str, exc: BaseException) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _run(prog: str, parser_factory: Callable, runner_name: str, argv: Sequence[str] | None) -> int:
    from prunekit.errors import PrunekitError

    parser = parser_factory(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        from prunekit.recipes.common import require_recipe_modules

        require_recipe_modules()  # transformers & co. come with an extra: say which, not a traceback
        runner = RUNNERS[runner_name]()
        runner(args)
    except (PrunekitError, FileNotFoundError) as exc:
        # PrunekitError covers RecipeError, ConfigError and SelectionError. Full traceback: PRUNEKIT_DEBUG=1.
        if os.environ.get("PRUNEKIT_DEBUG"):
            raise
        return _fail(prog, exc)
    except ModuleNotFoundError as exc:
        from prunekit.recipes.common import RECIPES_EXTRA

        if os.environ.get("PRUNEKIT_DEBUG") or not exc.name:
            raise
        return _fail(prog, RuntimeError(f"the package {exc.name!r} is not installed (the recipes need "
                                        f"`{RECIPES_EXTRA}`)"))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def _glue_runner() -> Callable:
    from prunekit.recipes.data import get_glue_task
    from prunekit.recipes.glue import run_glue

    def run(args: object) -> None:
        get_glue_task(args.task_name)  # unknown task: fail before anything else
        run_glue(args)

    return run


def _squad_runner() -> Callable:
    from prunekit.recipes.squad import run_squad

    return run_squad


def _oneshot_runner() -> Callable:
    from prunekit.oneshot.cli import run_oneshot

    return run_oneshot


def _oneshot_parser(prog: str) -> object:
    from prunekit.oneshot.cli import oneshot_parser

    return oneshot_parser(prog)


# runner name -> factory of the function that runs the parsed arguments (imported only when used)
RUNNERS: dict[str, Callable[[], Callable]] = {"glue": _glue_runner, "squad": _squad_runner,
                                              "oneshot": _oneshot_runner}


def glue_main(argv: Sequence[str] | None = None) -> int:
    """``prunekit-glue``: fine-tune / prune / distil on a GLUE task."""
    from prunekit.recipes.args import glue_parser

    return _run("prunekit-glue", glue_parser, "glue", argv)


def squad_main(argv: Sequence[str] | None = None) -> int:
    """``prunekit-squad``: fine-tune / prune / distil on SQuAD v1.1."""
    from prunekit.recipes.args import squad_parser

    return _run("prunekit-squad", squad_parser, "squad", argv)


def structured_main(argv: Sequence[str]) -> int:
    """``prunekit oneshot --structured``: remove FFN channels, heads and layers physically (issue: real speed)."""
    import argparse

    from prunekit.oneshot.structured.cli import add_structured_arguments, run_structured

    parser = argparse.ArgumentParser(prog="prunekit oneshot --structured",
                                     description="Structured one-shot pruning of a decoder LLM: whole FFN "
                                     "channels, attention heads and layers removed, widths slimmed.")
    return run_structured(add_structured_arguments(parser).parse_args(list(argv)))


def distill_main(argv: Sequence[str] | None = None, prog: str = "prunekit distill") -> int:
    """``prunekit distill``: recover a pruned decoder LLM by distillation (prunekit.recipes.llm_distill)."""
    from prunekit.errors import PrunekitError
    from prunekit.recipes.llm_distill import config_from_args, distill_parser, run_distill

    args = distill_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run_distill(config_from_args(args))
    except (PrunekitError, FileNotFoundError) as exc:
        if os.environ.get("PRUNEKIT_DEBUG"):
            raise
        return _fail(prog, exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


USAGE = """usage: prunekit {glue,squad,oneshot,distill} [flags]

  glue     fine-tune / prune / distil a sequence classifier on a GLUE task (same as prunekit-glue)
  squad    fine-tune / prune / distil an extractive QA model on SQuAD v1.1 (same as prunekit-squad)
  oneshot  prune a decoder LLM in one shot from calibration text (SparseGPT, Wanda, magnitude);
           with --structured, remove FFN channels, heads and layers physically (faster models)
  distill  recover a pruned decoder LLM by distillation from its dense teacher

'prunekit glue --help' lists the flags."""


def main(argv: Sequence[str] | None = None) -> int:
    """``prunekit <command> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command == "glue":
        from prunekit.recipes.args import glue_parser

        return _run("prunekit glue", glue_parser, "glue", rest)
    if command == "squad":
        from prunekit.recipes.args import squad_parser

        return _run("prunekit squad", squad_parser, "squad", rest)
    if command == "oneshot" and "--structured" in rest:
        return structured_main(rest)
    if command == "oneshot":
        return _run("prunekit oneshot", _oneshot_parser, "oneshot", rest)
    if command == "distill":
        return distill_main(rest)
    if command in {"--version", "version"}:
        try:
            from importlib.metadata import version

            print(version("prunekit"))
        except Exception:  # noqa: BLE001
            print("unknown")
        return 0
    print(f"prunekit: error: unknown command {command!r}; choose glue, squad, oneshot or distill (see prunekit --help)",
          file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
