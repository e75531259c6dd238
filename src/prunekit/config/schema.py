"""Typed, immutable pruning configs.

``PrunerConfig`` is one pruner with every key resolved; ``PruningConfig`` is the tuple of pruners a
``Pruning`` object runs. Both are frozen pydantic models whose fields are immutable (tuples, strings,
numbers), so no two configs can share mutable state (the original's ``pruning_configs=[{}]`` default
leaked values between configs).

Every validation failure surfaces as :class:`prunekit.errors.ConfigError` naming the key, the bad value
and what is allowed; pydantic's own ``ValidationError`` never escapes the constructors.
"""
from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from prunekit.errors import ConfigError, nearest

PROGRESSIVE_SUFFIX = "_progressive"
PATTERN_LOCK = "pattern_lock"

# What each field accepts, in words; used for every error message about that field.
_ALLOWED: dict[str, str] = {
    "target_sparsity": "allowed: a float in [0, 1)",
    "pattern": "allowed: NxM (e.g. 4x1), channelxM / Nxchannel, N:M with 0<N<M (e.g. 2:4), mha",
    "op_names": "allowed: a regex or a list of regexes (empty = every module)",
    "excluded_op_names": "allowed: a regex or a list of regexes",
    "pruning_op_types": "allowed: a non-empty list of module class-name substrings, e.g. ['Conv', 'Linear']",
    "start_step": "allowed: an int >= 0",
    "end_step": "allowed: an int >= start_step",
    "pruning_frequency": "allowed: an int >= 1",
    "min_sparsity_ratio_per_op": "allowed: a float in [0, 1), <= max_sparsity_ratio_per_op",
    "max_sparsity_ratio_per_op": "allowed: a float in [0, 1)",
    "low_memory_usage": "allowed: true or false",
    "lock_init_sparsity": "allowed: true or false",
    "reg_coeff": "allowed: a finite float >= 0",
}


def _parse_pattern(spec: str) -> Any:
    """Parse a pattern spec; imported lazily so that config stays importable without torch-heavy modules."""
    from prunekit.patterns import parse_pattern

    return parse_pattern(spec)


def _criteria() -> Any:
    """The criterion registry; imported lazily for the same reason as :func:`_parse_pattern`."""
    from prunekit.criteria import CRITERIA

    return CRITERIA


#: the original's names that are not pruning types here, and where that job lives
_NOT_CARRIED_OVER = {
    "wanda": "the original's Wanda is a function: prunekit.compat.prune_wanda(model, dataloader, ...) or "
             "prunekit.oneshot(model, calibration, {'method': 'wanda'})",
}
#: pruning types that run once over calibration data, so they have no progressive (step by step) form
_ONE_PASS = (PATTERN_LOCK, "sparse_gpt", "retrain_free")


def _pruning_types() -> list[str]:
    """Every valid ``pruning_type``: each registered criterion, and its progressive form (not pattern_lock)."""
    names = list(_criteria())
    return names + [n + PROGRESSIVE_SUFFIX for n in names if n not in _ONE_PASS]


def _pruning_type_allowed() -> str:
    return (f"allowed: a criterion name ({', '.join(_criteria())}), optionally with the suffix "
            f"'{PROGRESSIVE_SUFFIX}'")


def _literal_options(model: type[BaseModel], key: str) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` field (None options dropped), or None for other fields."""
    field = model.model_fields.get(key)
    if field is None:
        return None
    options = [a for a in _literal_args(field.annotation) if a is not None]
    return tuple(options) or None


def _literal_args(annotation: Any) -> list[Any]:
    """Flatten ``Literal[...]`` (possibly inside ``X | None``) into its values."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literal_args(arg)]


def _allowed(model: type[BaseModel], key: str) -> str:
    """Human description of what ``key`` accepts (the model's ``ALLOWED`` table, else its Literal options)."""
    options = _literal_options(model, key)
    if options:
        return "allowed: " + ", ".join(repr(o) for o in options)
    if key == "pruning_type":
        return _pruning_type_allowed()
    return getattr(model, "ALLOWED", _ALLOWED).get(key, "see the prunekit configuration reference")


def _config_error_from(exc: ValidationError, model: type[BaseModel]) -> ConfigError:
    """Turn pydantic's first error into a ConfigError that names key, value and what is allowed."""
    err = exc.errors()[0]
    original = (err.get("ctx") or {}).get("error")
    if isinstance(original, ConfigError):
        return original
    loc = [p for p in err["loc"] if isinstance(p, str)]
    nested = getattr(model, "NESTED", {})
    if loc and loc[0] in nested and len(loc) > 1:  # an error inside a sub-config names the sub-config's key
        model, loc = nested[loc[0]], loc[1:]
    key = loc[-1] if loc else model.__name__
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        close = nearest(key, model.model_fields)
        return ConfigError(
            key, value, f"unknown key; allowed keys: {', '.join(model.model_fields)}",
            f"did you mean {close!r}?" if close else None,
        )
    if err["type"] == "missing":
        return ConfigError(key, None, f"required; {_allowed(model, key)}")
    options = _literal_options(model, key)
    # only a string can be a typo of an option (str() of a YAML alias bomb would never finish)
    close = nearest(value, [str(o) for o in options]) if options and isinstance(value, str) else None
    if options:  # the allowed text already lists the options; pydantic's message would repeat them
        hint = f"did you mean {close!r}?" if close else None
    else:
        hint = err["msg"]
    return ConfigError(key, value, _allowed(model, key), hint)


def with_location(err: ConfigError, where: str) -> ConfigError:
    """Re-raise helper: the same error with ``where`` (e.g. 'in pruning_configs[1]') added to the hint."""
    hint = f"{err.hint}; {where}" if err.hint else where
    return ConfigError(err.key, err.value, err.allowed, hint)


def check_unit_interval(key: str, value: float, allowed: str | None = None) -> float:
    """Sparsities live in [0, 1): 1.0 would remove a layer entirely."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(key, value, allowed or _ALLOWED[key])
    return value


def as_tuple(key: str, value: Any, allowed: str | None = None) -> Any:
    """Accept one string or any list/tuple of strings; store an immutable tuple."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ConfigError(key, value, allowed or _ALLOWED[key])


def check_regexes(key: str, value: tuple[str, ...]) -> tuple[str, ...]:
    """Every entry must compile as a Python regular expression."""
    for regex in value:
        try:
            re.compile(regex)
        except (re.error, TypeError) as err:
            raise ConfigError(key, regex, "allowed: valid Python regular expressions",
                              f"re.error: {err}") from None
    return value


def drop_unset(data: Any) -> Any:
    """A mapping without its None values, so that "not set" means the default (a ``mode="before"`` validator)."""
    if isinstance(data, Mapping):
        return {k: v for k, v in data.items() if v is not None}
    return data


class FrozenConfig(BaseModel):
    """Base of every typed prunekit config: unknown keys rejected, instances immutable, errors as ConfigError.

    A subclass may set ``ALLOWED`` (key -> "allowed: ..." text for error messages) and ``NESTED``
    (field -> the config class of its items, so an error inside names the inner key).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    ALLOWED: ClassVar[dict[str, str]] = _ALLOWED
    NESTED: ClassVar[dict[str, type[BaseModel]]] = {}

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error_from(exc, type(self)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        """Configs are immutable (shared safely between pruners, runs and threads)."""
        raise ConfigError(name, value, "allowed: nothing, configs are immutable",
                          "use with_overrides(...) to get a changed copy")

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """Copies are re-validated (pydantic's would not be): no invalid config can exist."""
        return type(self)(**{**dict(self), **(update or {})})

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # noqa: D102 - same contract as pydantic's
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise _config_error_from(exc, cls) from None


class PrunerConfig(FrozenConfig):
    """One pruner, fully resolved (the original's 2.x keys and defaults).

    Build it directly, with :meth:`build`, or through the loaders of :class:`PruningConfig`. ``pattern`` is
    stored without the 1.x prefix (``tile_pattern_4x1`` -> ``4x1``); for N:M patterns ``target_sparsity`` must
    be <= N/M and ``max_sparsity_ratio_per_op`` is lowered to N/M. ``pattern_lock`` needs start_step == end_step.
    """

    target_sparsity: float = 0.9
    pruning_type: str = "snip_momentum"
    pattern: str = "4x1"
    op_names: tuple[str, ...] = ()
    excluded_op_names: tuple[str, ...] = ()
    pruning_op_types: tuple[str, ...] = ("Conv", "Linear")
    start_step: int = 0
    end_step: int = 0
    pruning_frequency: int = 1
    pruning_scope: Literal["global", "local"] = "global"
    sparsity_decay_type: Literal["exp", "linear", "cos", "cube"] = "exp"
    criterion_reduce_type: Literal["mean", "sum", "max"] = "mean"
    min_sparsity_ratio_per_op: float = 0.0
    max_sparsity_ratio_per_op: float = 0.98
    low_memory_usage: bool = False
    lock_init_sparsity: bool = False
    reg_type: Literal["group_lasso"] | None = None
    reg_coeff: float = 0.0

    @classmethod
    def build(cls, **kwargs: Any) -> PrunerConfig:
        """Validate ``kwargs`` into a PrunerConfig; a None value means "use the default"."""
        return cls(**kwargs)

    # ---- derived views -------------------------------------------------------------------------
    @property
    def criterion(self) -> str:
        """The criterion name, without the ``_progressive`` suffix."""
        return self.pruning_type.removesuffix(PROGRESSIVE_SUFFIX)

    @property
    def progressive(self) -> bool:
        """Whether the pruner is progressive (``pruning_type`` ends with ``_progressive``)."""
        return self.pruning_type.endswith(PROGRESSIVE_SUFFIX)

    def to_dict(self) -> dict[str, Any]:
        """Every key, with lists instead of tuples (YAML/JSON friendly); ``build(**d)`` gives it back."""
        return self.model_dump(mode="json")

    def with_overrides(self, **kwargs: Any) -> PrunerConfig:
        """A new, re-validated PrunerConfig with ``kwargs`` replacing the current values."""
        return type(self).build(**{**self.to_dict(), **kwargs})

    # ---- field validation ------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _drop_none(cls, data: Any) -> Any:
        """None means "not set" (as in the original's local dicts); the default applies."""
        return drop_unset(data)

    @field_validator(
        "target_sparsity", "min_sparsity_ratio_per_op", "max_sparsity_ratio_per_op", "reg_coeff",
        "start_step", "end_step", "pruning_frequency", mode="before",
    )
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        """``True`` as a number is always a typo; pydantic would silently read it as 1."""
        if isinstance(value, bool):
            raise ConfigError(info.field_name, value, _ALLOWED[info.field_name])
        return value

    @field_validator("target_sparsity", "min_sparsity_ratio_per_op", "max_sparsity_ratio_per_op")
    @classmethod
    def _unit_interval(cls, value: float, info: Any) -> float:
        return check_unit_interval(info.field_name, value)

    @field_validator("reg_coeff")
    @classmethod
    def _non_negative_finite(cls, value: float) -> float:
        if not (math.isfinite(value) and value >= 0.0):
            raise ConfigError("reg_coeff", value, _ALLOWED["reg_coeff"])
        return value

    @field_validator("start_step", "end_step")
    @classmethod
    def _non_negative_step(cls, value: int, info: Any) -> int:
        if value < 0:
            raise ConfigError(info.field_name, value, "allowed: an int >= 0")
        return value

    @field_validator("pruning_frequency")
    @classmethod
    def _positive_frequency(cls, value: int) -> int:
        if value < 1:
            raise ConfigError("pruning_frequency", value, _ALLOWED["pruning_frequency"])
        return value

    @field_validator("pruning_type")
    @classmethod
    def _known_pruning_type(cls, value: str) -> str:
        base = value.removesuffix(PROGRESSIVE_SUFFIX)
        if base not in _criteria():
            # the nearest of the pruning types (progressive forms included), never of other keys
            close = nearest(value, _pruning_types())
            hint = _NOT_CARRIED_OVER.get(base) or (f"did you mean {close!r}?" if close else None)
            raise ConfigError("pruning_type", value, _pruning_type_allowed(), hint)
        if base in _ONE_PASS and base != value:
            raise ConfigError("pruning_type", value, _pruning_type_allowed(),
                              f"{base} has no progressive form (it prunes in one pass)")
        return value

    @field_validator("pattern", mode="before")
    @classmethod
    def _normalise_pattern(cls, value: Any) -> Any:
        """Drop the 1.x prefix: ``tile_pattern_4x1`` / ``oc_pattern_4x1`` mean ``4x1``."""
        if isinstance(value, str):
            return value.strip().rsplit("_", 1)[-1]
        return value

    @field_validator("pattern")
    @classmethod
    def _parseable_pattern(cls, value: str) -> str:
        _parse_pattern(value)  # raises ConfigError(key="pattern")
        return value

    @field_validator("op_names", "excluded_op_names", "pruning_op_types", mode="before")
    @classmethod
    def _listify(cls, value: Any, info: Any) -> Any:
        return as_tuple(info.field_name, value)

    @field_validator("op_names", "excluded_op_names")
    @classmethod
    def _compilable_regexes(cls, value: tuple[str, ...], info: Any) -> tuple[str, ...]:
        return check_regexes(info.field_name, value)

    @field_validator("pruning_op_types")
    @classmethod
    def _non_empty_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(value):
            raise ConfigError("pruning_op_types", list(value), _ALLOWED["pruning_op_types"])
        return value

    # ---- cross-field rules -----------------------------------------------------------------------
    @model_validator(mode="after")
    def _cross_field(self) -> PrunerConfig:
        if self.end_step < self.start_step:
            raise ConfigError("end_step", self.end_step,
                              f"allowed: an int >= start_step ({self.start_step})")
        if self.criterion == PATTERN_LOCK and self.start_step != self.end_step:
            raise ConfigError("end_step", self.end_step,
                              f"allowed: equal to start_step ({self.start_step}) for pruning_type 'pattern_lock'",
                              "pattern_lock only fixes the existing zeros once")
        pattern = _parse_pattern(self.pattern)
        unfit = _criteria().get(self.criterion).pattern_error(pattern)
        if unfit:
            raise ConfigError("pattern", self.pattern, f"allowed: {unfit}",
                              f"pruning_type {self.pruning_type!r}")
        self._apply_pattern_maximum(pattern.max_sparsity)
        if self.min_sparsity_ratio_per_op > self.max_sparsity_ratio_per_op:
            raise ConfigError("min_sparsity_ratio_per_op", self.min_sparsity_ratio_per_op,
                              f"allowed: a float in [0, max_sparsity_ratio_per_op = "
                              f"{self.max_sparsity_ratio_per_op}]")
        return self

    def _apply_pattern_maximum(self, maximum: float) -> None:
        """N:M patterns cap sparsity at N/M: the target must fit, and the per-op cap is lowered to it."""
        if maximum >= 1.0:
            return
        # pattern_lock prunes nothing new, so its target is irrelevant (as in the original).
        if self.target_sparsity > maximum and self.criterion != PATTERN_LOCK:
            raise ConfigError("target_sparsity", self.target_sparsity,
                              f"allowed: <= {maximum} (the most pattern {self.pattern!r} can remove)")
        if self.max_sparsity_ratio_per_op > maximum:
            # Documented behaviour, not an error: the default 0.98 cannot apply to N:M.
            self.__dict__["max_sparsity_ratio_per_op"] = maximum


class PruningConfig(FrozenConfig):
    """The pruners one ``Pruning`` object runs (at least one)."""

    NESTED: ClassVar[dict[str, type[BaseModel]]] = {"pruners": PrunerConfig}

    pruners: tuple[PrunerConfig, ...]

    @field_validator("pruners", mode="before")
    @classmethod
    def _build_pruners(cls, value: Any) -> Any:
        """Accept PrunerConfigs or dicts; report which entry is wrong."""
        if isinstance(value, (PrunerConfig, Mapping)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError("pruners", value, "allowed: a non-empty list of PrunerConfig or dicts")
        built = []
        for i, item in enumerate(value):
            if isinstance(item, PrunerConfig):
                built.append(item)
            elif isinstance(item, Mapping):
                try:
                    built.append(PrunerConfig.build(**item))
                except ConfigError as err:
                    raise with_location(err, f"in pruners[{i}]") from None
            else:
                raise ConfigError(f"pruners[{i}]", item, "allowed: a PrunerConfig or a dict")
        return tuple(built)

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, pruning_configs: Any = None, **global_kwargs: Any) -> PruningConfig:
        """The original's 2.x/3.x form: ``WeightPruningConfig(pruning_configs=[...], **globals)``.

        No ``pruning_configs`` (None or empty) gives one pruner from the globals; otherwise one pruner
        per local dict, where a key missing or None in the local dict takes the global value.
        """
        from prunekit.config import legacy  # legacy builds on this module

        return cls(pruners=legacy.pruners_from_kwargs(pruning_configs, global_kwargs))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningConfig:
        """Any dict form: 2.x kwargs (``pruning_configs`` + globals), 1.x ``pruning: approach: ...``."""
        from prunekit.config import legacy

        return cls(pruners=legacy.pruners_from_dict(data))

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> PruningConfig:
        """Load a YAML file (path) or YAML text, in any supported form, with a safe loader."""
        from prunekit.config import legacy

        return cls(pruners=legacy.pruners_from_document(legacy.load_yaml(path_or_text)))

    # ---- export ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The 2.x form with fully resolved local dicts; ``from_dict`` reads it back identically."""
        return {"pruning_configs": [p.to_dict() for p in self.pruners]}

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of :meth:`to_dict`; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def with_overrides(self, **kwargs: Any) -> PruningConfig:
        """A new config with ``kwargs`` replacing the given keys in every pruner (re-validated)."""
        pruners = []
        for i, pruner in enumerate(self.pruners):
            try:
                pruners.append(pruner.with_overrides(**kwargs))
            except ConfigError as err:
                raise with_location(err, f"in pruners[{i}]") from None
        return type(self)(pruners=pruners)
