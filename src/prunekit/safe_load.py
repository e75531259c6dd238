"""Reading torch files without unpickling code.

A ``.pt`` file is a pickle: loading a planted one without ``weights_only`` runs whatever it names. Every state
prunekit writes (``Pruning.state_dict()``, optimizer and scheduler states, RNG states) is tensors and plain
containers, so it is always read with ``weights_only=True``; anything else is refused with one line.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError


class UnsafeFileError(PrunekitError, ValueError):
    """A file holds something other than tensors and plain containers (or is no torch file at all)."""


def load_torch_file(path: str | os.PathLike, what: str = "state") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a file that needs more than that raises one line.

    Args:
        path: the file.
        what: what the file should hold, for the message (e.g. ``"pruning state"``).
    """
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page long; its one useful line names the refused global or opcode
        detail = next((line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line), "")
        detail = detail.replace("WeightsUnpickler error:", "").strip() or "not tensors and plain containers"
        raise UnsafeFileError(
            f"{path}: refused to load the {what}: it holds more than tensors and plain containers ({detail[:200]}); "
            "prunekit never writes such files, so it was not written by prunekit (or is damaged): delete it or "
            "replace it with one prunekit saved") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UnsafeFileError(f"{path}: cannot read the {what} ({first}); expected a file written by "
                              "torch.save") from exc
