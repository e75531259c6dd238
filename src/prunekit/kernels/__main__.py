"""``python -m prunekit.kernels build``: compile the optional CPU kernels now (e.g. when building an image), so no
training run waits for them; ``python -m prunekit.kernels info``: where the build is and whether it exists."""
from __future__ import annotations

import argparse
import sys

from prunekit import kernels


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (1 when the kernels cannot be built)."""
    parser = argparse.ArgumentParser(prog="python -m prunekit.kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the kernels (or confirm the cached build loads)")
    build.add_argument("--force", action="store_true", help="discard the cached build and compile again")
    sub.add_parser("info", help="print the build folder and whether it is built")
    args = parser.parse_args(argv)

    if args.command == "info":
        directory = kernels.build_dir()
        state = "built" if (directory / f"{directory.name}.so").is_file() else "not built"
        print(f"{directory} ({state}; {kernels.ENV_SWITCH}={'on' if kernels.enabled() else 'off'})")
        return 0
    try:
        _, directory, seconds = kernels.build(force=args.force)
    except Exception as exc:  # noqa: BLE001 - the user asked for the build: say why it failed, in one line
        print(f"prunekit: the CPU kernels did not build ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); training uses the eager path",
              file=sys.stderr)
        return 1
    if seconds:
        print(f"built in {seconds:.1f} s: {directory}")
    else:
        print(f"already built: {directory}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
