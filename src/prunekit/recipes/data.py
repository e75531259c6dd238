"""GLUE and SQuAD v1.1 loading: the Hugging Face hub through ``datasets``, or local copies in the standard formats.

Local formats:

* GLUE: the original TSVs, ``<data_dir>/<TASK>/{train,dev}.tsv`` (``<data_dir>/glue/<TASK>/`` and a folder that
  holds the two files directly work too). ``<TASK>`` is the GLUE folder name (``SST-2``, ``MRPC``, ``CoLA`` ...).
  Files are read as UTF-8 with an optional BOM and without quote handling (MRPC has bare double quotes).
* SQuAD: the official JSON, ``<data_dir>/squad/{train-v1.1.json,dev-v1.1.json}`` or the same names in
  ``<data_dir>``. With only the dev file, ``dev_derived_split=True`` splits dev by article (1-38 train, 39-48 eval):
  numbers from that split are *dev-derived*, never official SQuAD numbers.

Every loader returns plain Python lists of dicts, so the recipes do not depend on ``datasets`` for local data.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prunekit.errors import nearest
from prunekit.recipes.common import DATA_DIR_ENV, RecipeError

logger = logging.getLogger("prunekit.recipes")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class GlueTask:
    name: str  # hub config name: sst2, mrpc, ...
    folder: str  # GLUE folder name: SST-2, MRPC, ...
    hub_keys: tuple[str, str | None]  # text columns on the hub
    tsv_keys: tuple[str | int, str | int | None]  # text columns in the TSV (names, or indices without header)
    tsv_label: str | int
    num_labels: int  # 1 = regression
    metric: str  # main metric name
    has_header: bool = True
    dev_file: str = "dev.tsv"
    hub_validation: str = "validation"
    label_map: dict[str, int] = field(default_factory=dict)  # text labels in TSVs -> hub label ids

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI2 = {"entailment": 0, "not_entailment": 1}
GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", "SST-2", ("sentence", None), ("sentence", None), "label", 2, "accuracy"),
    "mrpc": GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", 2, "f1"),
    "cola": GlueTask("cola", "CoLA", ("sentence", None), (3, None), 1, 2, "matthews_correlation", has_header=False),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", 2, "accuracy",
                     label_map=_NLI2),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", 2, "accuracy",
                    label_map=_NLI2),
    "wnli": GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", 2, "accuracy"),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", 2, "f1"),
    "mnli": GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label", 3,
                     "accuracy", dev_file="dev_matched.tsv", hub_validation="validation_matched",
                     label_map={"entailment": 0, "neutral": 1, "contradiction": 2}),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", 1,
                     "pearson"),
}
_TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def get_glue_task(name: str) -> GlueTask:
    key = (name or "").strip().lower()
    key = _TASK_ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        hint = nearest(key, GLUE_TASKS)
        raise RecipeError(f"--task_name: got {name!r}; choose one of {', '.join(GLUE_TASKS)}"
                          + (f" (did you mean {hint!r}?)" if hint else ""))
    return GLUE_TASKS[key]


# ---------------------------------------------------------------------------------------------------------------
# hub access


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (false at once when HF_*_OFFLINE is set)."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(path: str, config: str | None, what: str, local_hint: str) -> Any:
    howto = (f"to use local copies pass --data_dir DIR or set {DATA_DIR_ENV}=DIR, with {local_hint}")
    if not hub_reachable():
        raise RecipeError(f"cannot reach the Hugging Face hub to download {what} (offline?); {howto}")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is in the recipes extra
        raise RecipeError(f"loading {what} from the hub needs the 'datasets' package "
                          f"(pip install 'prunekit[recipes]'); {howto}") from exc
    try:
        return datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except Exception as exc:  # noqa: BLE001 - turned into one readable line
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"could not load {what} from the hub ({reason}); {howto}") from exc


# ---------------------------------------------------------------------------------------------------------------
# GLUE


def read_text(path: Path, what: str) -> str:
    """The file as UTF-8 text (a BOM is dropped); a binary or otherwise encoded file is one line naming where."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise RecipeError(f"{what} {str(path)!r} is a binary file (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                          "expected UTF-8, optionally with a BOM: re-save it as UTF-8") from exc


def _read_tsv(path: Path) -> list[list[str]]:
    text = read_text(path, "GLUE file")
    return list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))


def _glue_folder(data_dir: str | os.PathLike, task: GlueTask) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise RecipeError(f"--data_dir: {str(root)!r} is not a folder")
    candidates = [root / task.folder, root / "glue" / task.folder, root]
    for cand in candidates:
        if (cand / "train.tsv").is_file() and (cand / task.dev_file).is_file():
            if cand == root and root.name.lower().replace("-", "") != task.folder.lower().replace("-", ""):
                continue  # a bare folder is only taken when its name is the task's
            return cand
    raise RecipeError(f"no GLUE {task.folder} data under {str(root)!r}: expected "
                      f"{root / task.folder}/train.tsv and {task.dev_file} (GLUE TSV format)")


def _parse_label(raw: str, task: GlueTask, path: Path, line: int) -> float | int:
    """The label of one row; a value outside the task's classes fails here, naming the row (not later, as an
    out-of-bounds target deep in the loss after the output folder exists)."""
    raw = raw.strip()
    where = f"{path}:{line}: label {raw!r}"
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise RecipeError(f"{where} is not a finite number (GLUE {task.folder} labels are similarity scores)")
        return value
    if task.label_map:
        if raw not in task.label_map:
            raise RecipeError(f"{where} is not one of {sorted(task.label_map)} (GLUE {task.folder})")
        return task.label_map[raw]
    allowed = list(range(task.num_labels))
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value not in allowed:
        raise RecipeError(f"{where} is not one of {allowed} (GLUE {task.folder} has {task.num_labels} classes)")
    return value


def read_glue_tsv(path: str | os.PathLike, task: GlueTask) -> list[dict]:
    """Read one GLUE TSV into ``[{"text_a", "text_b", "label"}]``. Malformed rows are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"GLUE file {str(path)!r} does not exist")
    rows = _read_tsv(path)
    if not rows:
        raise RecipeError(f"GLUE file {str(path)!r} is empty")
    if task.has_header:
        header = [h.strip() for h in rows[0]]
        try:
            ia = header.index(task.tsv_keys[0])
            ib = header.index(task.tsv_keys[1]) if task.tsv_keys[1] is not None else None
            il = header.index(task.tsv_label)
        except ValueError as exc:
            raise RecipeError(f"{path}: header {header} lacks a column GLUE {task.folder} needs "
                              f"({task.tsv_keys[0]!r}, {task.tsv_keys[1]!r}, {task.tsv_label!r})") from exc
        body, first_line = rows[1:], 2
    else:
        ia, ib, il = task.tsv_keys[0], task.tsv_keys[1], task.tsv_label
        body, first_line = rows, 1
    needed = max(i for i in (ia, ib, il) if i is not None)
    out, skipped = [], 0
    for offset, row in enumerate(body):
        if len(row) <= needed:  # too few columns: the known broken lines of the GLUE files (e.g. QQP)
            skipped += 1
            continue
        label = _parse_label(row[il], task, path, first_line + offset)
        out.append({"text_a": row[ia], "text_b": row[ib] if ib is not None else None, "label": label})
    if not out:
        what = "only a header" if task.has_header and not body else \
            f"no row with the {needed + 1} columns GLUE {task.folder} needs ({len(body)} rows)"
        raise RecipeError(f"GLUE file {str(path)!r} holds no examples: {what}; expected tab-separated rows of "
                          f"{task.tsv_keys[0]!r}, {task.tsv_keys[1]!r} and label {task.tsv_label!r}")
    if skipped:
        logger.warning("%s: skipped %d malformed rows", path, skipped)
    return out


def load_glue(task: GlueTask | str, data_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...]}`` of ``{"text_a", "text_b", "label"}`` for one GLUE task."""
    task = get_glue_task(task) if isinstance(task, str) else task
    if data_dir:
        folder = _glue_folder(data_dir, task)
        splits = {"train": read_glue_tsv(folder / "train.tsv", task),
                  "validation": read_glue_tsv(folder / task.dev_file, task)}
        logger.info("GLUE %s from %s: %d train / %d dev examples", task.folder, folder, len(splits["train"]),
                    len(splits["validation"]))  # after reading: a bad file's error is the only line printed
        return splits
    ds = _load_hub("nyu-mll/glue", task.name, f"GLUE {task.name}",
                   f"DIR/{task.folder}/train.tsv and DIR/{task.folder}/{task.dev_file} in the GLUE TSV format")
    ka, kb = task.hub_keys

    def convert(split):
        return [{"text_a": r[ka], "text_b": r[kb] if kb else None, "label": r["label"]} for r in ds[split]]

    return {"train": convert("train"), "validation": convert(task.hub_validation)}


# ---------------------------------------------------------------------------------------------------------------
# SQuAD v1.1

#: Articles of dev-v1.1.json used for training in the dev-derived split (the rest are the evaluation set).
DEV_DERIVED_TRAIN_ARTICLES = 38


def read_squad_json(path: str | os.PathLike) -> list[dict]:
    """Official SQuAD v1.1 JSON -> ``[{"id", "title", "context", "question", "answers": {"text", "answer_start"}}]``
    in file order."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"SQuAD file {str(path)!r} does not exist")
    text = read_text(path, "SQuAD file")
    out = []
    try:
        for article in json.loads(text)["data"]:
            title = article.get("title", "")
            for para in article["paragraphs"]:
                context = para["context"]
                for qa in para["qas"]:
                    answers = {"text": [str(a["text"]) for a in qa["answers"]],
                               "answer_start": [int(a["answer_start"]) for a in qa["answers"]]}
                    if not isinstance(context, str) or not isinstance(qa["question"], str):
                        raise TypeError(f"question {qa.get('id')!r}: context and question must be strings")
                    out.append({"id": qa["id"], "title": title, "context": context, "question": qa["question"],
                                "answers": answers})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"[:200]
        raise RecipeError(f"{path} is not a SQuAD v1.1 JSON file ({reason}); expected "
                          '{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}'
                          ) from exc
    if not out:
        raise RecipeError(f"SQuAD file {str(path)!r} holds no questions")
    return out


def split_dev_by_article(examples: list[dict], n_train_articles: int = DEV_DERIVED_TRAIN_ARTICLES):
    """Split dev examples by article (in file order): the first ``n_train_articles`` articles train, the rest eval."""
    titles: list[str] = []
    for ex in examples:
        if not titles or titles[-1] != ex["title"]:
            if ex["title"] not in titles:
                titles.append(ex["title"])
    train_titles = set(titles[:n_train_articles])
    return ([ex for ex in examples if ex["title"] in train_titles],
            [ex for ex in examples if ex["title"] not in train_titles])


def _squad_folder(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise RecipeError(f"--data_dir: {str(root)!r} is not a folder")
    for cand in (root / "squad", root):
        if (cand / "dev-v1.1.json").is_file() or (cand / "train-v1.1.json").is_file():
            return cand
    raise RecipeError(f"no SQuAD data under {str(root)!r}: expected {root / 'squad'}/train-v1.1.json and "
                      "dev-v1.1.json (official SQuAD v1.1 JSON)")


def load_squad(data_dir: str | os.PathLike | None = None, *, train_file: str | None = None,
               validation_file: str | None = None, dev_derived_split: bool = False) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...]}`` of SQuAD v1.1 examples.

    Sources, first match wins: explicit ``train_file`` / ``validation_file``; ``data_dir``; the hub
    (``rajpurkar/squad``). ``dev_derived_split`` trains on dev articles 1-38 and evaluates on 39-48.
    """
    if train_file or validation_file:
        if dev_derived_split:
            dev = read_squad_json(validation_file or train_file)
            train, val = split_dev_by_article(dev)
            return {"train": train, "validation": val}
        if not (train_file and validation_file):
            raise RecipeError("give both --train_file and --validation_file (or --dev_derived_split with one)")
        return {"train": read_squad_json(train_file), "validation": read_squad_json(validation_file)}
    if data_dir:
        folder = _squad_folder(data_dir)
        dev_path, train_path = folder / "dev-v1.1.json", folder / "train-v1.1.json"
        if dev_derived_split:
            train, val = split_dev_by_article(read_squad_json(dev_path))
            logger.info("SQuAD dev-derived split from %s: %d train / %d eval questions", dev_path, len(train),
                        len(val))
            return {"train": train, "validation": val}
        if not train_path.is_file():
            raise RecipeError(f"{train_path} does not exist; add it, or pass --dev_derived_split to train on dev "
                              "articles 1-38 and evaluate on 39-48 (dev-derived numbers, not official SQuAD)")
        return {"train": read_squad_json(train_path), "validation": read_squad_json(dev_path)}
    ds = _load_hub("rajpurkar/squad", None, "SQuAD v1.1",
                   "DIR/squad/train-v1.1.json and DIR/squad/dev-v1.1.json (official SQuAD v1.1 JSON)")

    def convert(split):
        return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
                 "answers": {"text": list(r["answers"]["text"]),
                             "answer_start": list(r["answers"]["answer_start"])}} for r in ds[split]]

    if dev_derived_split:
        train, val = split_dev_by_article(convert("validation"))
        return {"train": train, "validation": val}
    return {"train": convert("train"), "validation": convert("validation")}


def take(examples: list, limit: int | None) -> list:
    """The first ``limit`` items (all when ``limit`` is None)."""
    return examples if limit is None else examples[: max(0, int(limit))]
