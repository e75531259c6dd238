"""Structured one-shot pruning of decoder LLMs: FFN channels, attention heads and whole layers, removed physically.

``importance`` scores units from one calibration pass; ``heads`` knows the legal grouped-query cuts; ``plan``
decides widths and kept units; ``compensate`` restores removed channels' mean (bias) or refits the kept columns
(least squares); ``apply`` cuts through prunekit.slimming; ``cli`` is ``prunekit oneshot --structured``.
"""
from prunekit.oneshot.structured.cli import add_structured_arguments, run_structured

__all__ = ["add_structured_arguments", "run_structured"]
