"""Calibration and evaluation text for LLMs: documents in, token windows out.

Sources (:func:`load_texts`): a plain ``.txt`` file (one document), a ``.jsonl`` file (one document per line,
field ``text_column``), a SQuAD-format ``.json`` (its Wikipedia paragraphs, optionally a range of articles), or,
for online users, a Hugging Face ``datasets`` name (``wikitext:wikitext-2-raw-v1`` selects a config).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from prunekit.errors import ConfigError

# SmolLM2's recommended protocol on the shared SQuAD file (shared/models/README.md)
CALIBRATION_ARTICLES = (0, 38)   # articles 1-38
HELD_OUT_ARTICLES = (38, 48)     # articles 39-48
# documents are joined paragraph by paragraph, as plain text (an EOS between paragraphs costs perplexity)
DOCUMENT_SEPARATOR = "\n\n"


def squad_paragraphs(path: str | Path, articles: tuple[int, int] | None = None) -> list[str]:
    """The context paragraphs of a SQuAD v1.1 JSON file, article by article (``articles`` = [start, stop))."""
    data = _read_json(path, "calibration")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ConfigError("calibration", str(path), "allowed: a SQuAD-format JSON with a top-level 'data' list")
    chosen = data["data"][slice(*articles)] if articles else data["data"]
    return [p["context"] for article in chosen for p in article.get("paragraphs", [])]


def _read_json(path: str | Path, key: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(key, str(path), "allowed: a UTF-8 JSON file", str(e).splitlines()[0]) from None


def load_texts(source: str | Path | Sequence[str], *, split: str = "train", text_column: str = "text",
               key: str = "calibration", held_out: bool = False) -> list[str]:
    """Documents from a file, a list of strings or a ``datasets`` name (see the module docstring).

    A SQuAD-format ``.json`` gives the paragraphs of articles 1-38 for calibration / training, or of articles
    39-48 with ``held_out`` (evaluation), so the same file can serve both without the evaluation reading
    calibration text.
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise ConfigError(key, type(source).__name__, "allowed: a list of strings")
        return list(source)
    path = Path(str(source))
    if path.is_dir():
        raise ConfigError(key, str(source), "allowed: a .txt, .jsonl or SQuAD .json file, or a dataset name")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _jsonl_texts(path, text_column, key)
        if suffix == ".json":
            return squad_paragraphs(path, HELD_OUT_ARTICLES if held_out else CALIBRATION_ARTICLES)
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise ConfigError(key, str(source), "allowed: a UTF-8 text file") from None
    if path.suffix.lower() in (".txt", ".jsonl", ".json") or "/" in str(source) and path.parent.exists():
        raise ConfigError(key, str(source), "allowed: an existing file, or a Hugging Face dataset name",
                          "no such file")
    return _hub_texts(str(source), split, text_column, key)


def _jsonl_texts(path: Path, text_column: str, key: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(key, f"{path}:{lineno}", "allowed: one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                raise ConfigError("text_column", text_column,
                                  f"allowed: a string field present in every line of {path} (line {lineno} "
                                  f"has {sorted(row) if isinstance(row, dict) else type(row).__name__})")
            texts.append(row[text_column])
    return texts


def _hub_texts(name: str, split: str, text_column: str, key: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(key, name, "a dataset name needs the 'datasets' package: "
                          "pip install 'prunekit[recipes]'") from None
    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as e:  # the hub's errors are many; one line names the input
        raise ConfigError(key, name, "allowed: a local file or a loadable Hugging Face dataset",
                          str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if text_column not in ds.column_names:
        raise ConfigError("text_column", text_column, f"allowed: one of {ds.column_names}")
    return [t for t in ds[text_column] if isinstance(t, str)]


def _token_stream(texts: Sequence[str], tokenizer: Any, separator: str = DOCUMENT_SEPARATOR) -> torch.Tensor:
    """All documents joined by ``separator`` and tokenised as one stream (no special tokens)."""
    joined = separator.join(t for t in texts if t.strip())
    return torch.tensor(tokenizer(joined, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(texts: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int,
                        seed: int = 0, key: str = "calibration") -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets of the joined text, ``[n, seqlen]``."""
    stream = _token_stream(texts, tokenizer)
    if stream.numel() < seqlen + 1:
        raise ConfigError(key, f"{stream.numel()} tokens", f"allowed: text of at least seqlen + 1 = {seqlen + 1} "
                          "tokens (one calibration sample)")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def evaluation_windows(texts: Sequence[str], tokenizer: Any, seqlen: int, max_windows: int | None = None,
                       key: str = "eval_text") -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens from the start of the joined text."""
    stream = _token_stream(texts, tokenizer)
    count = stream.numel() // seqlen
    if count == 0:
        raise ConfigError(key, f"{stream.numel()} tokens", f"allowed: text of at least seqlen = {seqlen} tokens")
    if max_windows is not None:
        count = min(count, int(max_windows))
    return stream[: count * seqlen].view(count, seqlen)
