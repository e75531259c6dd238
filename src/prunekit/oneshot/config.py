"""The one-shot config: which method, pattern, sparsity and layers, and how calibration runs.

A frozen pydantic model like every prunekit config (prunekit.config.schema.FrozenConfig): unknown keys are
rejected and every error is a :class:`~prunekit.errors.ConfigError` naming the key, the value and what is
allowed. Whether the method can produce the pattern is decided here, by the method's own ``check_pattern``,
so a bad combination fails before a model is touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml
from pydantic import field_validator, model_validator

from prunekit.config.schema import FrozenConfig, as_tuple, check_regexes, check_unit_interval, drop_unset
from prunekit.errors import ConfigError

_ALLOWED: dict[str, str] = {
    "method": "allowed: a one-shot method (sparsegpt, wanda, magnitude, retrain_free)",
    "target_sparsity": "allowed: a float in [0, 1)",
    "pattern": "allowed: 1x1 (unstructured) or N:M with 0<N<M (e.g. 2:4, 4:8); channel patterns for retrain_free",
    "op_names": "allowed: a regex or a list of regexes over qualified module names (empty = every Linear/Conv1D "
                "inside the decoder blocks)",
    "excluded_op_names": "allowed: a regex or a list of regexes over qualified module names",
    "profile": "allowed: a sparsity profile name (uniform, owl)",
    "owl_threshold": "allowed: a finite float > 0 (OWL's outlier multiple M of the layer's mean score)",
    "owl_lambda": "allowed: a float in [0, 0.5) (OWL's largest deviation from the target sparsity)",
    "nsamples": "allowed: an int >= 1",
    "seqlen": "allowed: an int >= 2",
    "block_size": "allowed: an int >= 1",
    "dampening": "allowed: a finite float >= 0",
    "dsnot_cycles": "allowed: an int >= 1",
    "dsnot_threshold": "allowed: a finite float >= 0",
    "seed": "allowed: an int >= 0",
    "true_sequential": "allowed: true, false or null (null: the method's default, true for sparsegpt)",
    "device": "allowed: a torch device string such as 'cpu', 'cuda', 'cuda:1' (default: cuda when available)",
}

_INTS = {"nsamples": 1, "seqlen": 2, "block_size": 1, "dsnot_cycles": 1, "seed": 0}
_FLOATS = ("target_sparsity", "owl_threshold", "owl_lambda", "dampening", "dsnot_threshold")


def _methods() -> Any:
    # the methods package registers its members on import; loaded lazily so the config module stays light
    from prunekit.oneshot.methods import METHODS

    return METHODS


def _profiles() -> Any:
    from prunekit.oneshot import profiles

    return profiles


class OneShotConfig(FrozenConfig):
    """Every key of a one-shot run (see docs/oneshot.md for each one's meaning)."""

    ALLOWED: ClassVar[dict[str, str]] = _ALLOWED

    method: str = "sparsegpt"
    target_sparsity: float = 0.5
    pattern: str = "1x1"
    op_names: tuple[str, ...] = ()
    excluded_op_names: tuple[str, ...] = ()
    profile: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    nsamples: int = 128
    seqlen: int = 2048
    block_size: int = 128
    dampening: float = 0.01
    dsnot: bool = False
    dsnot_cycles: int = 100
    dsnot_threshold: float = 5e-5  # per calibration token (prunekit.oneshot.methods.MethodOptions)
    use_variant: bool = False
    seed: int = 0
    true_sequential: bool | None = None
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    # ---- fields ------------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _drop_none(cls, data: Any) -> Any:
        """None means "not set": the default applies (as with PrunerConfig)."""
        return drop_unset(data)

    @field_validator(*_INTS, *_FLOATS, mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        if isinstance(value, bool):  # True as a number is a typo pydantic would read as 1
            raise ConfigError(info.field_name, value, _ALLOWED[info.field_name])
        return value

    @field_validator(*_INTS)
    @classmethod
    def _int_minimum(cls, value: int, info: Any) -> int:
        if value < _INTS[info.field_name]:
            raise ConfigError(info.field_name, value, _ALLOWED[info.field_name])
        return value

    @field_validator("target_sparsity")
    @classmethod
    def _unit_interval(cls, value: float) -> float:
        return check_unit_interval("target_sparsity", value, _ALLOWED["target_sparsity"])

    @field_validator("owl_threshold")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError("owl_threshold", value, _ALLOWED["owl_threshold"])
        return value

    @field_validator("owl_lambda")
    @classmethod
    def _lambda_range(cls, value: float) -> float:
        if not 0.0 <= value < 0.5:
            raise ConfigError("owl_lambda", value, _ALLOWED["owl_lambda"])
        return value

    @field_validator("dampening", "dsnot_threshold")
    @classmethod
    def _non_negative(cls, value: float, info: Any) -> float:
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(info.field_name, value, _ALLOWED[info.field_name])
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        _methods().get(value)  # ConfigError(key="method") listing the registered methods
        return value

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        _profiles().PROFILES.get(value)  # ConfigError(key="profile") listing the registered profiles
        return value

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_text(cls, value: Any) -> Any:
        from prunekit.patterns import normalize_spec, parse_pattern

        if not isinstance(value, str):
            raise ConfigError("pattern", value, _ALLOWED["pattern"])
        parse_pattern(value)  # ConfigError(key="pattern") naming the forms
        return normalize_spec(value)

    @field_validator("op_names", "excluded_op_names", mode="before")
    @classmethod
    def _listify(cls, value: Any, info: Any) -> Any:
        return as_tuple(info.field_name, value, _ALLOWED[info.field_name])

    @field_validator("op_names", "excluded_op_names")
    @classmethod
    def _regexes(cls, value: tuple[str, ...], info: Any) -> tuple[str, ...]:
        return check_regexes(info.field_name, value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise ConfigError("device", value, _ALLOWED["device"]) from None
        return value

    # ---- cross-field rules ---------------------------------------------------------------------------
    @model_validator(mode="after")
    def _cross_field(self) -> OneShotConfig:
        pattern = self.parsed_pattern
        method = _methods().get(self.method)
        method.check_pattern(pattern)  # ConfigError(key="pattern"): the method decides what it can produce
        method.check_options(self.method_options())
        self.make_profile().check_pattern(pattern)  # e.g. owl cannot vary N:M sparsity
        if pattern.max_sparsity < 1.0:  # N:M fixes the sparsity at N/M
            if "target_sparsity" in self.model_fields_set and \
                    not math.isclose(self.target_sparsity, pattern.max_sparsity, abs_tol=1e-9):
                raise ConfigError("target_sparsity", self.target_sparsity,
                                  f"allowed: {pattern.max_sparsity} for pattern {self.pattern!r} (N:M prunes "
                                  f"exactly N of every M weights), or leave it unset")
            self.__dict__["target_sparsity"] = pattern.max_sparsity
        if self.profile == "owl":
            low, high = self.target_sparsity - self.owl_lambda, self.target_sparsity + self.owl_lambda
            if low < 0.0 or high >= 1.0:
                raise ConfigError("owl_lambda", self.owl_lambda,
                                  f"allowed: a value keeping target_sparsity ± owl_lambda inside [0, 1) "
                                  f"(target_sparsity is {self.target_sparsity})")
        return self

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def parsed_pattern(self) -> Any:
        """The :class:`prunekit.patterns.Pattern` of ``pattern``."""
        from prunekit.patterns import parse_pattern

        return parse_pattern(self.pattern)

    def make_profile(self) -> Any:
        """A fresh :class:`prunekit.oneshot.profiles.SparsityProfile` for one run."""
        params = {"m": self.owl_threshold, "lmbda": self.owl_lambda} if self.profile == "owl" else {}
        return _profiles().make_profile(self.profile, **params)

    def method_options(self) -> Any:
        """The knobs the method reads, as :class:`prunekit.oneshot.methods.MethodOptions`."""
        from prunekit.oneshot.methods import MethodOptions

        return MethodOptions(block_size=self.block_size, dampening=self.dampening, dsnot=self.dsnot,
                             dsnot_cycles=self.dsnot_cycles, dsnot_threshold=self.dsnot_threshold,
                             use_variant=self.use_variant, seed=self.seed, true_sequential=self.true_sequential)

    def to_dict(self) -> dict[str, Any]:
        """Every key, lists instead of tuples (YAML/JSON friendly); ``OneShotConfig(**d)`` gives it back."""
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of :meth:`to_dict`; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> OneShotConfig:
        """Read a YAML file (path) or YAML text holding a mapping of these keys."""
        from prunekit.config.legacy import load_yaml  # safe loader, duplicate keys refused

        data = load_yaml(path_or_text)
        if not isinstance(data, Mapping):
            raise ConfigError("config", type(data).__name__, "allowed: a YAML mapping of one-shot keys")
        return cls(**data)

    def with_overrides(self, **kwargs: Any) -> OneShotConfig:
        """A new, re-validated config with ``kwargs`` replacing the given keys (None: keep)."""
        data = {k: v for k, v in self.to_dict().items() if k in self.model_fields_set}
        data.update({k: v for k, v in kwargs.items() if v is not None})
        return type(self)(**data)


def load_oneshot_config(obj: Any) -> OneShotConfig:
    """A :class:`OneShotConfig` from itself, a dict, None (all defaults), a YAML path or YAML text."""
    if isinstance(obj, OneShotConfig):
        return obj
    if obj is None:
        return OneShotConfig()
    if isinstance(obj, Mapping):
        return OneShotConfig(**obj)
    if isinstance(obj, (str, Path)):
        return OneShotConfig.from_yaml(obj)
    raise ConfigError("config", type(obj).__name__, "allowed: OneShotConfig, a dict, a YAML path or YAML text")
