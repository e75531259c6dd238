"""One-shot pruning of decoder LLMs from calibration data, layer by layer (see docs/oneshot.md).

``pipeline`` owns calibration capture and block onloading; ``stats`` the input statistics of a block's linears;
``structure`` finds the decoder blocks; ``data`` turns text into token windows; ``evaluate`` measures perplexity.
"""
from prunekit.oneshot.data import calibration_windows, evaluation_windows, load_texts, squad_paragraphs
from prunekit.oneshot.evaluate import perplexity
from prunekit.oneshot.pipeline import BlockInputs, InMemoryLayers, LayerContext, run_sequential
from prunekit.oneshot.stats import InputStats
from prunekit.oneshot.structure import DecoderStructure, block_linears, find_decoder

__all__ = ["BlockInputs", "DecoderStructure", "InMemoryLayers", "InputStats", "LayerContext", "block_linears",
           "calibration_windows", "evaluation_windows", "find_decoder", "load_texts", "perplexity",
           "run_sequential", "squad_paragraphs"]
