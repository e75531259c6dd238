"""The typed options of a structured run (a frozen pydantic config: unknown keys rejected, ConfigError)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from prunekit.errors import ConfigError
from prunekit.oneshot.structured.compensate import COMPENSATIONS
from prunekit.oneshot.structured.heads import HEAD_CUTS
from prunekit.oneshot.structured.plan import Request

from prunekit.config.schema import FrozenConfig

METHOD_NAMES = ("flap", "wanda-sp", "weight-norm")
# FLAP restores the removed channels' mean; Wanda-sp and the weight-norm baseline are plain removals
DEFAULT_COMPENSATION = {"flap": "auto", "wanda-sp": "none", "weight-norm": "none"}


class StructuredOptions(FrozenConfig):
    """What ``prunekit oneshot --structured`` removes and how (see docs/structured.md)."""

    method: Literal["flap", "wanda-sp", "weight-norm"] = "flap"
    ffn_sparsity: float | None = None
    head_sparsity: float = 0.0
    drop_layers: int = 0
    target_params: float | None = None
    round_to: int = 32
    non_uniform: bool = False
    head_cut: str = "auto"
    compensation: str | None = None

    @field_validator("ffn_sparsity", "head_sparsity")
    @classmethod
    def _fraction(cls, value: float | None, info: Any) -> float | None:
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(info.field_name, value, "allowed: a fraction in [0, 1)",
                              "1 or more would remove every unit of a layer" if value >= 1 else None)
        return value

    @field_validator("target_params")
    @classmethod
    def _target(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ConfigError("target_params", value, "allowed: a fraction in (0, 1) of the decoder parameters kept")
        return value

    @field_validator("drop_layers")
    @classmethod
    def _drop(cls, value: int) -> int:
        if value < 0:
            raise ConfigError("drop_layers", value, "allowed: an int >= 0")
        return value

    @field_validator("round_to")
    @classmethod
    def _round(cls, value: int) -> int:
        if value < 1:
            raise ConfigError("round_to", value, "allowed: an int >= 1 (1 = no rounding)")
        return value

    @field_validator("head_cut")
    @classmethod
    def _head_cut(cls, value: str) -> str:
        if value not in HEAD_CUTS:
            raise ConfigError("head_cut", value, f"allowed: {', '.join(HEAD_CUTS)}")
        return value

    @field_validator("compensation")
    @classmethod
    def _compensation(cls, value: str | None) -> str | None:
        if value is not None and value not in COMPENSATIONS:
            raise ConfigError("compensation", value, f"allowed: {', '.join(COMPENSATIONS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "StructuredOptions":
        if self.target_params is not None and self.ffn_sparsity is not None:
            raise ConfigError("target_params", self.target_params, "allowed: either --target-params or "
                              "--ffn-sparsity, not both (the budget form solves for the FFN width)")
        if (self.target_params is None and not self.ffn_sparsity and not self.head_sparsity
                and not self.drop_layers):
            raise ConfigError("ffn_sparsity", self.ffn_sparsity, "allowed: something to remove: --ffn-sparsity, "
                              "--head-sparsity, --drop-layers or --target-params")
        return self

    @property
    def compensation_mode(self) -> str:
        return self.compensation or DEFAULT_COMPENSATION[self.method]

    def request(self) -> Request:
        return Request(self.ffn_sparsity, self.head_sparsity, self.drop_layers, self.target_params, self.round_to,
                       self.non_uniform, self.head_cut, self.method)
