"""Hostile config input costs bounded time and memory: alias bombs, huge values, deep nesting (issue 13, item 15).

Bounds are checked by allocation (tracemalloc) and message length, never by timing.
"""
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit.criteria  # noqa: F401 - imported (with torch) before anything is measured
from prunekit.config import load_config
from prunekit.config.legacy import MAX_YAML_BYTES, MAX_YAML_NODES
from prunekit.errors import QUOTE_LIMIT, ConfigError, quote

MB = 1 << 20


def alias_bomb_yaml(levels: int) -> str:
    """billion laughs: ``levels`` anchors, each a list of nine aliases of the previous (9**levels leaves)."""
    parts = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "target_sparsity: [" + ", ".join(parts) + "]\n"


def shared_bomb(levels: int) -> list:
    """The same in Python: one list shared nine times per level (tiny in memory, 9**levels when walked)."""
    value: list = ["lol"] * 9
    for _ in range(levels):
        value = [value] * 9
    return value


def peak_of(fn) -> tuple[BaseException, int]:
    tracemalloc.start()
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the error is what is measured
        caught = err
    else:  # pragma: no cover - the input is invalid
        raise AssertionError("no error raised")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return caught, peak


def assert_one_line_config_error(err: BaseException, key: str) -> None:
    assert isinstance(err, ConfigError), f"{type(err).__name__}: {str(err)[:200]}"
    assert err.key == key
    text = str(err)
    assert "\n" not in text and len(text) < 800, text[:300]


def test_yaml_alias_bomb_is_refused_before_expansion():
    # 9**9 = 387 million leaves: expanding or printing it would take minutes and gigabytes
    err, peak = peak_of(lambda: load_config(alias_bomb_yaml(9)))
    assert_one_line_config_error(err, "yaml")
    assert f"at most {MAX_YAML_NODES}" in str(err) and "aliases" in str(err)
    assert peak < 20 * MB


def test_moderate_alias_reuse_still_loads():
    # aliases are legitimate YAML: a shared list of layer names used by two pruners
    doc = ("pruning_configs:\n"
           "  - {op_names: &layers ['0', '2'], pattern: 4x1, target_sparsity: 0.5}\n"
           "  - {excluded_op_names: *layers, pattern: 1x1, target_sparsity: 0.3}\n")
    config = load_config(doc)
    assert config.pruners[0].op_names == ("0", "2") == config.pruners[1].excluded_op_names


def test_recursive_alias_is_refused():
    err, _ = peak_of(lambda: load_config("target_sparsity: &a [1, *a]\n"))
    assert_one_line_config_error(err, "yaml")
    assert "recursive alias" in str(err)


def test_python_value_bomb_is_quoted_bounded():
    # the same bomb handed over as a dict: the error quotes it without walking it
    err, peak = peak_of(lambda: load_config({"target_sparsity": shared_bomb(9)}))
    assert_one_line_config_error(err, "target_sparsity")
    assert peak < 20 * MB


@pytest.mark.parametrize("doc, key", [
    ("target_sparsity: " + "1" * 5000 + "\n", "yaml"),         # more digits than int() accepts
    ("target_sparsity: " + "1" * 5000, "yaml"),                # one line, longer than a file name
    ("target_sparsity: '" + "x" * 20_000 + "'\n", "target_sparsity"),
    ({"target_sparsity": 10 ** 5000}, "target_sparsity"),
    ({"x" * 100_000: 1}, "x" * 100_000),
])
def test_huge_or_deep_values_give_one_line_errors(doc, key):
    err, peak = peak_of(lambda: load_config(doc))
    assert_one_line_config_error(err, key)
    assert peak < 20 * MB


def test_deep_nesting_is_refused_before_python_recursion_runs_out():
    with pytest.raises(Exception) as info:
        load_config("target_sparsity: " + "[" * 1000 + "\n")
    assert_one_line_config_error(info.value, "yaml")
    assert "nested at most" in str(info.value)


def test_oversized_documents_are_refused_before_parsing(tmp_path):
    big = "op_names: [" + ", ".join(["layer"] * (MAX_YAML_BYTES // 7 + 1)) + "]\n"
    path = tmp_path / "huge.yaml"
    path.write_text(big)
    for source in (big, path):
        with pytest.raises(ConfigError) as info:
            load_config(source)
        assert_one_line_config_error(info.value, "config")
        assert f"at most {MAX_YAML_BYTES}" in str(info.value)


def test_quote_matches_repr_for_ordinary_values():
    for value in (0.5, "snip_momentum", ["0", "2"], ("a", 1), {"b": 1, "a": [1, 2]}, None, True, 3):
        assert quote(value) == repr(value)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=30) | st.dictionaries(st.text(max_size=20), inner, max_size=30),
    max_leaves=60,
)


@settings(max_examples=60, deadline=None)
@given(json_like)
def test_quote_is_always_bounded(value):
    text = quote(value)
    assert len(text) <= QUOTE_LIMIT
    if len(repr(value)) <= QUOTE_LIMIT and not isinstance(value, (list, dict)):
        assert text == repr(value)
