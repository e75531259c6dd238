"""Physical slimming: remove zeroed FFN channels and attention heads, keep outputs identical.

``auto_slim_configs`` writes pruning configs whose result can be removed; ``slim`` removes it; ``save_slimmed`` /
``load_slimmed`` persist per-layer shapes. Detection (``find_ffn_groups`` / ``find_attention_groups``) follows
the model's autograd dataflow and falls back to module-structure rules when tracing fails.
"""
from prunekit.slimming.auto_config import auto_slim_configs
from prunekit.slimming.detect import Detection, detect, find_attention_groups, find_ffn_groups
from prunekit.slimming.groups import AttentionGroup, FFNGroup, WeightSlice
from prunekit.slimming.io import load_slimmed, save_slimmed
from prunekit.slimming.report import AttentionChange, FFNChange, SlimReport
from prunekit.slimming.slim import slim

__all__ = [
    "AttentionChange", "AttentionGroup", "Detection", "FFNChange", "FFNGroup", "SlimReport", "WeightSlice",
    "auto_slim_configs", "detect", "find_attention_groups", "find_ffn_groups", "load_slimmed", "save_slimmed",
    "slim",
]
