"""One-shot pruning of decoder LLMs from calibration data, layer by layer (see docs/oneshot.md).

``prunekit.oneshot(model_or_path, calibration, config)`` runs it (:func:`prunekit.oneshot.api.oneshot`).
``config`` holds the typed config; ``api`` validates and runs; ``prune`` selects and prunes a block's linears;
``checkpoint`` streams safetensors checkouts block by block; ``pipeline`` owns calibration capture and block
onloading; ``stats`` the input statistics of a block's linears; ``structure`` finds the decoder blocks; ``data``
turns text into token windows; ``evaluate`` measures perplexity; ``methods`` and ``profiles`` hold the algorithms.
"""
import sys
import types

from prunekit.oneshot.api import oneshot
from prunekit.oneshot.config import OneShotConfig, load_oneshot_config
from prunekit.oneshot.data import calibration_windows, evaluation_windows, load_texts, squad_paragraphs
from prunekit.oneshot.evaluate import perplexity
from prunekit.oneshot.pipeline import BlockInputs, InMemoryLayers, LayerContext, run_sequential
from prunekit.oneshot.report import OneShotReport
from prunekit.oneshot.stats import InputStats
from prunekit.oneshot.structure import DecoderStructure, block_linears, find_decoder

__all__ = ["BlockInputs", "DecoderStructure", "InMemoryLayers", "InputStats", "LayerContext", "OneShotConfig",
           "OneShotReport", "block_linears", "calibration_windows", "evaluation_windows", "find_decoder",
           "load_oneshot_config", "load_texts", "oneshot", "perplexity", "run_sequential", "squad_paragraphs"]


class _CallableModule(types.ModuleType):
    """``prunekit.oneshot(...)`` is the API call while ``prunekit.oneshot.pipeline`` etc. stay importable."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003 - same signature as api.oneshot
        return oneshot(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
