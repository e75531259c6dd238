"""The original's other config forms, translated into :class:`PrunerConfig` objects.

* 2.x/3.x: ``WeightPruningConfig(pruning_configs=[{...}, ...], **global_kwargs)``; also the 2.0-2.2 YAML block
  ``pruning: approach: weight_compression_v2: {<globals>, pruners: [!PrunerV2 {...}]}`` with the same keys.
* 1.x: ``pruning: approach: weight_compression_pytorch: {<globals>, pruners: [!Pruner {...}]}`` with 1.x key names.

Unlike the original, nothing here mutates the caller's dicts or lists, and unknown keys are errors (the
original only warned and passed them through).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from prunekit.config.schema import PrunerConfig, with_location
from prunekit.errors import ConfigError, nearest, quote

# ---- 2.x -------------------------------------------------------------------------------------------
V2_EXTRA_KEYS = ("backend", "resume_from_pruned_checkpoint", "parameters")

# ---- 1.x (experimental.pytorch_pruner, INC 1.14) -----------------------------------------------------
V1_RENAMES = {
    "prune_type": "pruning_type",
    "prune_domain": "pruning_scope",
    "update_frequency_on_step": "pruning_frequency",
    "max_sparsity_ratio_per_layer": "max_sparsity_ratio_per_op",
    "names": "op_names",
    "prune_layer_type": "pruning_op_types",
    "start_step": "start_step",
    "end_step": "end_step",
    "target_sparsity": "target_sparsity",
    "sparsity_decay_type": "sparsity_decay_type",
    "pattern": "pattern",
}
V1_EXCLUSION_KEYS = ("excluded_names", "extra_excluded_names", "not_to_prune_names", "exclude_names")
V1_EPOCH_KEYS = ("initial_sparsity", "start_epoch", "end_epoch", "update_frequency", "method")
V1_DEFAULTS: dict[str, Any] = {
    "target_sparsity": 0.0,
    "pattern": "4x1",
    "pruning_type": "snip_momentum",
    "pruning_scope": "global",
    "pruning_frequency": 1,
    "max_sparsity_ratio_per_op": 0.98,
    "pruning_op_types": ("Conv2d", "Linear"),
}
_EPOCH_HINT = (
    "prunekit counts optimizer steps, not epochs: use start_step = start_epoch * steps_per_epoch, "
    "end_step = end_epoch * steps_per_epoch, pruning_frequency = update_frequency * steps_per_epoch "
    "(steps_per_epoch = len(train_dataloader) // gradient_accumulation_steps); initial_sparsity is the "
    "model's current sparsity (set lock_init_sparsity: true to keep existing zeros); method has no equivalent"
)

#: the largest YAML document read (a pruning config is a few kilobytes, an INC file with long op lists tens of them)
MAX_YAML_BYTES = 1 << 20
#: the deepest nesting of YAML collections accepted (a pruning config nests four or five levels)
MAX_YAML_DEPTH = 50
#: the most YAML nodes a config document may hold once its aliases are expanded: a pruning config has tens to
#: hundreds; an alias bomb ("billion laughs") would otherwise turn a few lines into billions of values
MAX_YAML_NODES = 100_000

APPROACH_V1 = "weight_compression_pytorch"
APPROACH_V2 = "weight_compression_v2"
_PRUNER_TAGS = ("!Pruner", "!PrunerV2")


# ==== safe YAML ========================================================================================
class LegacyYamlLoader(yaml.SafeLoader):
    """A SafeLoader that reads ``!Pruner`` / ``!PrunerV2`` mappings as plain dicts and nothing else.

    It also rejects duplicate keys (PyYAML silently keeps the last), documents that expand (through aliases) to
    more than :data:`MAX_YAML_NODES` nodes or refer to themselves, and reads ``2:4`` as a string: YAML 1.1
    would otherwise parse the unquoted N:M pattern as the base-60 integer 124.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """PyYAML composes recursively: refuse deep nesting before Python's recursion limit is reached."""
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlLimitError(f"allowed: collections nested at most {MAX_YAML_DEPTH} deep",
                                     f"nesting too deep at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node:
        """The document's node graph, checked for its expanded size before anything is constructed from it."""
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Like SafeLoader's, but a key given twice is an error instead of a silent overwrite."""
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key is legitimate, not a duplicate
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                value = value_node.value if isinstance(value_node, yaml.ScalarNode) else value_node.tag
                raise ConfigError(key, value, "allowed: each key once per mapping",
                                  f"key given twice, line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class YamlLimitError(Exception):
    """A document the loader refuses to expand; :func:`load_yaml` turns it into a ConfigError naming the source."""

    def __init__(self, allowed: str, hint: str) -> None:
        super().__init__(f"{allowed} ({hint})")
        self.allowed, self.hint = allowed, hint


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, limit: int = MAX_YAML_NODES) -> None:
    """Refuse a node graph whose tree, with every alias expanded, holds more than ``limit`` nodes, or which
    contains itself. Each distinct node is visited once (sizes are memoised), so a bomb is measured in
    microseconds without being expanded."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()  # nodes whose subtree is being measured: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            entered.discard(key)
            size = 1 + sum(sizes[id(c)] for c in _children(node))
            if size > limit:
                raise YamlLimitError(f"allowed: at most {limit} YAML nodes once aliases are expanded (a pruning "
                                     f"config has a few hundred)", f"alias expansion past the limit at line "
                                     f"{node.start_mark.line + 1}")
            sizes[key] = size
        elif key not in sizes:
            if key in entered:
                raise YamlLimitError("allowed: aliases of nodes that do not contain the alias",
                                     f"recursive alias at line {node.start_mark.line + 1}")
            entered.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _construct_pruner(loader: LegacyYamlLoader, node: yaml.Node) -> dict[Any, Any]:
    """``!Pruner {...}`` is just a mapping of one pruner's keys."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("yaml tag", node.tag, "allowed: !Pruner / !PrunerV2 on a mapping of pruner keys",
                          f"line {node.start_mark.line + 1}")
    return loader.construct_mapping(node, deep=True)


def _reject_tag(loader: LegacyYamlLoader, node: yaml.Node) -> Any:
    """Any tag other than the standard YAML types and the pruner tags is refused, never constructed."""
    raise ConfigError("yaml tag", node.tag, "allowed: standard YAML types and !Pruner / !PrunerV2",
                      f"line {node.start_mark.line + 1}; prunekit never builds Python objects from YAML")


for _tag in _PRUNER_TAGS:
    LegacyYamlLoader.add_constructor(_tag, _construct_pruner)
LegacyYamlLoader.add_constructor(None, _reject_tag)  # type: ignore[arg-type]
# An empty prefix matches every tag without its own constructor, e.g. !!python/object:os.system.
LegacyYamlLoader.add_multi_constructor("", lambda loader, _suffix, node: _reject_tag(loader, node))
# Drop YAML 1.1 base-60 integers (`2:4` -> 124) while keeping every other int form.
LegacyYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
LegacyYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"),
)


def _looks_like_path(text: str) -> bool:
    """A one-line string naming a .yaml/.yml file or an existing file is a path, anything else is YAML text."""
    if "\n" in text:
        return False
    if text.strip().lower().endswith((".yaml", ".yml")):
        return True
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL byte: it is text
        return False


def load_yaml(path_or_text: str | Path) -> Any:
    """Parse a YAML file or YAML text with :class:`LegacyYamlLoader`; YAML errors become ConfigError."""
    source = path_or_text[:60] if isinstance(path_or_text, str) else "YAML text"
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and _looks_like_path(path_or_text)):
        path = Path(path_or_text)
        if not path.is_file():
            raise ConfigError("config", str(path), "allowed: an existing YAML file, YAML text or a dict")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError("config", str(path), f"allowed: a YAML file of at most {MAX_YAML_BYTES} bytes",
                              f"this one has {path.stat().st_size}")
        source, text = str(path), path.read_text(encoding="utf-8")
    elif isinstance(path_or_text, str):
        text = path_or_text
    else:
        raise ConfigError("config", path_or_text, "allowed: a YAML path or YAML text")
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError("config", source, f"allowed: YAML text of at most {MAX_YAML_BYTES} characters",
                          f"this one has {len(text)}")
    try:
        return yaml.load(text, Loader=LegacyYamlLoader)  # noqa: S506 - LegacyYamlLoader is a SafeLoader
    except YamlLimitError as err:
        raise ConfigError("yaml", source, err.allowed, err.hint) from None
    except yaml.YAMLError as err:
        raise ConfigError("yaml", source, "allowed: valid YAML", str(err).replace("\n", " ")[:500]) from None
    except RecursionError:  # PyYAML composes recursively: thousands of nested brackets
        raise ConfigError("yaml", source, "allowed: valid YAML nested a few levels deep",
                          "nested too deeply to parse") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        if isinstance(err, ConfigError):
            raise
        raise ConfigError("yaml", source, "allowed: valid YAML", str(err)[:200]) from None


# ==== dispatch =========================================================================================
def pruners_from_document(doc: Any) -> list[PrunerConfig]:
    """A parsed YAML document: a dict in any form, or a list of local (2.x) dicts."""
    if isinstance(doc, Mapping):
        return pruners_from_dict(doc)
    if isinstance(doc, list):
        return pruners_from_kwargs(doc, {})
    raise ConfigError("config", doc, "allowed: a YAML mapping (2.x keys, or pruning: approach: ...) "
                                     "or a list of pruner mappings")


def pruners_from_dict(data: Mapping[str, Any]) -> list[PrunerConfig]:
    """Detect the form of ``data`` and resolve it into pruners.

    A top-level ``pruning`` key means an INC YAML document (its other sections, e.g. ``model``, are not ours
    and are ignored); a top-level ``weight_compression_pytorch`` / ``weight_compression_v2`` key is the
    ``approach`` block itself; anything else is the 2.x kwargs form.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("config", data, "allowed: a dict")
    if "pruning" in data:
        return _from_inc_document(data["pruning"])
    if APPROACH_V1 in data or APPROACH_V2 in data:
        return _from_approach(data)
    rest = {k: v for k, v in data.items() if k != "pruning_configs"}
    return pruners_from_kwargs(data.get("pruning_configs"), rest)


def _from_inc_document(pruning: Any) -> list[PrunerConfig]:
    """The ``pruning:`` section of an INC YAML file (its ``train`` section is for INC's own loop)."""
    if not isinstance(pruning, Mapping) or not isinstance(pruning.get("approach"), Mapping):
        raise ConfigError("pruning", pruning, f"allowed: a mapping with approach: {APPROACH_V1} or {APPROACH_V2}")
    return _from_approach(pruning["approach"])


def _from_approach(approach: Mapping[str, Any]) -> list[PrunerConfig]:
    """``approach: {weight_compression_pytorch | weight_compression_v2: {...}}`` (exactly one of them)."""
    allowed = f"allowed: exactly one of {APPROACH_V1} (1.x) or {APPROACH_V2} (2.0-2.2)"
    names = list(approach)
    if len(names) != 1 or names[0] not in (APPROACH_V1, APPROACH_V2):
        hint = None
        if "weight_compression" in names:
            hint = "the <=1.13 epoch-based weight_compression block is not supported; " + _EPOCH_HINT
        raise ConfigError("pruning.approach", names, allowed, hint)
    block = approach[names[0]]
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise ConfigError(names[0], block, "allowed: a mapping of global keys plus pruners: [...]")
    if names[0] == APPROACH_V1:
        return pruners_from_v1(block)
    return pruners_from_kwargs(block.get("pruners"), {k: v for k, v in block.items() if k != "pruners"})


def _key_text(key: Any) -> str:
    """A mapping key as an error names it (YAML keys may be numbers or null; their quote is bounded)."""
    return key if isinstance(key, str) else quote(key)


# ==== 2.x ==============================================================================================
def _v2_keys() -> list[str]:
    """Keys a 2.x global or local dict may hold."""
    return [*PrunerConfig.model_fields, *V2_EXTRA_KEYS]


def normalise_v2(raw: Any, where: str) -> dict[str, Any]:
    """Check one 2.x dict (global or local) and return a new dict of PrunerConfig keys.

    None values are dropped (they mean "inherit"), ``parameters`` is flattened, ``backend`` is checked and
    dropped, and ``resume_from_pruned_checkpoint: true`` becomes ``lock_init_sparsity: true``.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(where.removeprefix("in "), raw, "allowed: a dict of pruner keys")
    for key in raw:
        if key not in _v2_keys():
            close = nearest(key, _v2_keys()) if isinstance(key, str) else None
            hint = f"did you mean {close!r}?; {where}" if close else where
            raise ConfigError(_key_text(key), raw[key], f"unknown key; allowed keys: {', '.join(_v2_keys())}", hint)
    out = {k: v for k, v in raw.items() if v is not None and k not in V2_EXTRA_KEYS}
    _flatten_parameters(raw.get("parameters"), out, where)
    backend = raw.get("backend")
    if backend not in (None, "default"):
        raise ConfigError("backend", backend, "allowed: None or 'default' (prunekit is PyTorch only)", where)
    resume = raw.get("resume_from_pruned_checkpoint")
    if resume is not None:
        _apply_resume(resume, out, where)
    return out


def _flatten_parameters(parameters: Any, out: dict[str, Any], where: str) -> None:
    """``parameters: {reg_coeff: x}`` is the same as ``reg_coeff: x`` (the original copied it up)."""
    if parameters is None:
        return
    if not isinstance(parameters, Mapping) or set(parameters) - {"reg_coeff"}:
        raise ConfigError("parameters", parameters, "allowed: {'reg_coeff': float >= 0}", where)
    coeff = parameters.get("reg_coeff")
    if coeff is None:
        return
    if "reg_coeff" in out and out["reg_coeff"] != coeff:
        raise ConfigError("reg_coeff", out["reg_coeff"],
                          f"allowed: one value; parameters.reg_coeff says {quote(coeff)}", where)
    out["reg_coeff"] = coeff


def _apply_resume(resume: Any, out: dict[str, Any], where: str) -> None:
    """Resuming from a pruned checkpoint means keeping its zeros: an alias of lock_init_sparsity."""
    if not isinstance(resume, bool):
        raise ConfigError("resume_from_pruned_checkpoint", resume, "allowed: true or false", where)
    if resume and out.get("lock_init_sparsity") is False:
        raise ConfigError("lock_init_sparsity", False,
                          "allowed: true (or unset) when resume_from_pruned_checkpoint is true", where)
    if resume:
        out["lock_init_sparsity"] = True


def pruners_from_kwargs(pruning_configs: Any, global_kwargs: Mapping[str, Any]) -> list[PrunerConfig]:
    """The 2.x resolution: one pruner from the globals, or one per local dict with globals filled in."""
    globals_ = normalise_v2(global_kwargs, "in the global kwargs")
    if pruning_configs is None or (isinstance(pruning_configs, (list, tuple)) and not pruning_configs):
        return [_build(globals_, "in the global kwargs", ())]
    if isinstance(pruning_configs, (Mapping, PrunerConfig)):
        pruning_configs = [pruning_configs]
    if not isinstance(pruning_configs, (list, tuple)):
        raise ConfigError("pruning_configs", pruning_configs, "allowed: a list of dicts (one per pruner)")
    pruners = []
    for i, local in enumerate(pruning_configs):
        where = f"in pruning_configs[{i}]"
        if isinstance(local, PrunerConfig):  # already fully resolved: globals do not apply
            pruners.append(local)
            continue
        own = normalise_v2(local, where)
        inherited = [k for k in globals_ if k not in own]
        pruners.append(_build({**globals_, **own}, where, inherited))
    return pruners


def _build(values: Mapping[str, Any], where: str, inherited: Iterable[str]) -> PrunerConfig:
    """PrunerConfig.build, with errors saying which dict they came from and whether the value was inherited."""
    try:
        return PrunerConfig.build(**values)
    except ConfigError as err:
        if err.key in set(inherited):
            where = f"{where}, value inherited from the global settings"
        raise with_location(err, where) from None


# ==== 1.x ==============================================================================================
def _v1_keys() -> list[str]:
    """Keys a 1.x global block or ``!Pruner`` may hold (the block also holds ``pruners``)."""
    return [*V1_RENAMES, *V1_EXCLUSION_KEYS]


def translate_v1(raw: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """One 1.x mapping -> (2.x-named values without exclusions, merged exclusion regexes)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(where.removeprefix("in "), raw, "allowed: a mapping of 1.x pruner keys (!Pruner {...})")
    out: dict[str, Any] = {}
    excluded: list[str] = []
    for key, value in raw.items():
        if key in V1_EPOCH_KEYS:
            if key == "initial_sparsity" and value in (0, None):
                continue  # the 1.14 step pruner ignored it, and 0 is what prunekit does anyway
            raise ConfigError(key, value, "allowed: step-based keys only (start_step, end_step, "
                                          "update_frequency_on_step)", f"{_EPOCH_HINT}; {where}")
        if key in V1_EXCLUSION_KEYS:
            excluded += _regex_list(key, value, where)
        elif key in V1_RENAMES:
            if value is not None:
                out[V1_RENAMES[key]] = value
        else:
            close = nearest(key, _v1_keys()) if isinstance(key, str) else None
            hint = f"did you mean {close!r}?; {where}" if close else where
            raise ConfigError(_key_text(key), value, f"unknown 1.x key; allowed keys: {', '.join(_v1_keys())}", hint)
    return out, excluded


def _regex_list(key: str, value: Any, where: str) -> list[str]:
    """A 1.x exclusion list: None, one regex or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(key, value, "allowed: a regex or a list of regexes", where)


def pruners_from_v1(block: Mapping[str, Any]) -> list[PrunerConfig]:
    """``weight_compression_pytorch``: 1.x globals (1.x defaults) + ``!Pruner`` locals (local wins when not
    None); exclusions are the global ones plus each pruner's own. No pruners: one pruner from the globals."""
    where = f"in {APPROACH_V1}"
    globals_, global_excluded = translate_v1({k: v for k, v in block.items() if k != "pruners"}, where)
    base = {**V1_DEFAULTS, **globals_}
    locals_ = block.get("pruners")
    if locals_ is None or locals_ == []:
        return [_build({**base, "excluded_op_names": _unique(global_excluded)}, where, ())]
    if not isinstance(locals_, list):
        raise ConfigError("pruners", locals_, "allowed: a list of !Pruner mappings", where)
    pruners = []
    for i, local in enumerate(locals_):
        here = f"in {APPROACH_V1}.pruners[{i}]"
        own, own_excluded = translate_v1(local, here)
        values = {**base, **own, "excluded_op_names": _unique(global_excluded + own_excluded)}
        pruners.append(_build(values, here, [k for k in globals_ if k not in own]))
    return pruners


# ==== overrides (``update_items_for_all_pruners`` / ``update_config``) ======================================
def translate_overrides(kwargs: Mapping[str, Any], where: str = "in update_items_for_all_pruners") -> dict[str, Any]:
    """Keys to overwrite in every pruner, named as any of the forms names them (2.x keys and their extras such as
    ``parameters``, or the 1.x names such as ``update_frequency_on_step``), as :class:`PrunerConfig` keys.

    1.x code calls the 1.x ``update_items_for_all_pruners`` with the names of its YAML, so each name is read as
    :func:`pruners_from_v1` reads it. A key named twice (1.x and 2.x name) with different values is an error;
    1.x exclusion lists are merged with ``excluded_op_names``.
    """
    known = list(dict.fromkeys([*_v2_keys(), *_v1_keys()]))
    for key in kwargs:
        if key not in known and key not in V1_EPOCH_KEYS:
            close = nearest(str(key), known)
            hint = f"did you mean {close!r}?; {where}" if close else where
            raise ConfigError(str(key), kwargs[key], f"unknown key; allowed keys: {', '.join(known)}", hint)
    out = normalise_v2({k: v for k, v in kwargs.items() if k in _v2_keys()}, where)
    renamed, excluded = translate_v1({k: v for k, v in kwargs.items() if k not in _v2_keys()}, where)
    for key, value in renamed.items():
        if key in out and out[key] != value:
            raise ConfigError(key, out[key], f"allowed: one value; its 1.x name says {value!r}", where)
        out[key] = value
    if any(k in kwargs for k in V1_EXCLUSION_KEYS):
        own = out.get("excluded_op_names", [])
        out["excluded_op_names"] = _unique(([own] if isinstance(own, str) else list(own)) + excluded)
    return out


def _unique(items: list[str]) -> list[str]:
    """Drop repeated regexes, keeping the first occurrence's position."""
    return list(dict.fromkeys(items))
