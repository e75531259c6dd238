"""Physical slimming: remove zeroed FFN channels and attention heads, keep outputs identical."""
from prunekit.slimming.detect import Detection, detect, find_attention_groups, find_ffn_groups
from prunekit.slimming.groups import AttentionGroup, FFNGroup, WeightSlice
from prunekit.slimming.report import AttentionChange, FFNChange, SlimReport
from prunekit.slimming.slim import slim

__all__ = [
    "AttentionChange", "AttentionGroup", "Detection", "FFNChange", "SlimReport", "FFNGroup", "WeightSlice", "detect", "find_attention_groups",
    "find_ffn_groups", "slim",
]
