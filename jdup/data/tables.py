"""Generic tables (CSV / TSV / JSONL, optionally ``.gz``: :func:`read_table`) and Hugging Face datasets
(:func:`read_hf_dataset`) with named text / label (/ poison) columns. Labels may be integers or strings; strings
are mapped to ids in sorted order.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jdup.data.records import TextDataset, _check_file, _open_text, _parse_int, validate, warn_empty_texts
from jdup.errors import JdupError


def _labels_to_ids(
    raw: list[Any], path: str, label_names: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Map raw label cells to ids. All-integer cells stay as they are; otherwise strings -> sorted ids."""
    if label_names is not None:
        index = {str(n): i for i, n in enumerate(label_names)}
        ids = []
        for r, v in enumerate(raw):
            if str(v) not in index:
                raise JdupError(f"row {r}: label {v!r} is not one of {list(label_names)}", path)
            ids.append(index[str(v)])
        return np.asarray(ids, np.int64), tuple(str(n) for n in label_names)

    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, float):
            return int(v) if v.is_integer() else None
        s = str(v).strip()
        if s.lstrip("-").isdigit():
            return int(s)
        return None

    ints = [as_int(v) for v in raw]
    if all(i is not None for i in ints):
        return np.asarray(ints, np.int64), None
    non_int = [v for v, i in zip(raw, ints, strict=True) if i is None]
    if any(isinstance(v, float) or _looks_numeric(v) for v in non_int):
        r = next(r for r, (v, i) in enumerate(zip(raw, ints, strict=True)) if i is None)
        raise JdupError(f"row {r}: label {raw[r]!r} is not an integer", path)
    names = tuple(sorted({str(v) for v in raw}))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in raw], np.int64), names


def _looks_numeric(v: Any) -> bool:
    try:
        float(str(v))
        return True
    except ValueError:
        return False


def _table_rows(path: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
    lower = path.lower().removesuffix(".gz")
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        with _open_text(path) as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JdupError(f"line {n + 1}: invalid JSON ({e.msg})", path) from None
                if not isinstance(obj, dict):
                    raise JdupError(f"line {n + 1}: expected a JSON object per line", path)
                yield obj
        return
    if delimiter is None:
        delimiter = "\t" if lower.endswith(".tsv") else ","
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        yield {"__fields__": reader.fieldnames}
        yield from reader


def read_table(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    *,
    poison_column: str | None = None,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    delimiter: str | None = None,
) -> TextDataset:
    """Read a CSV / TSV / JSONL file (optionally ``.gz``) with named columns.

    Args:
      path: the file; the format follows the extension (``.jsonl``/``.json``/``.ndjson`` = one object per line,
        ``.tsv`` = tab-separated, anything else = comma-separated with a header row).
      text_column: column holding the text.
      label_column: column holding the label: integers, or strings mapped to ids in sorted order (the names
        are kept in ``label_names``).
      poison_column: optional 0/1 column marking poisoned rows (default: all 0).
      label_names: fix the string -> id mapping explicitly (``label_names[i]`` is class ``i``).
      num_labels: when given, labels must lie in ``[0, num_labels)``.
      delimiter: override the CSV delimiter.

    Returns:
      A :class:`TextDataset`.
    """
    path = _check_file(path)
    texts, raw_labels, raw_poison = [], [], []
    fields: list[str] | None = None
    try:
        for r, row in enumerate(_table_rows(path, delimiter)):
            if "__fields__" in row and fields is None and r == 0:
                fields = list(row["__fields__"])
                missing = [c for c in (text_column, label_column, poison_column) if c and c not in fields]
                if missing:
                    raise JdupError(f"missing column(s) {missing}; the file has columns {fields}", path)
                continue
            n = len(texts)
            missing = [c for c in (text_column, label_column, poison_column) if c and row.get(c) is None]
            if missing:
                have = [k for k in row if k is not None]
                raise JdupError(f"row {n}: missing column(s) {missing}; the row has {have}", path)
            text = row[text_column]
            if not isinstance(text, str):
                raise JdupError(f"row {n}: text {text!r} is not a string", path)
            texts.append(text)
            raw_labels.append(row[label_column])
            raw_poison.append(_parse_int(row[poison_column], "poison flag", n, path) if poison_column else 0)
    except UnicodeDecodeError as e:
        raise JdupError(f"not UTF-8 text ({e})", path) from None
    except csv.Error as e:
        raise JdupError(f"malformed CSV ({e})", path) from None
    labels, names = _labels_to_ids(raw_labels, path, label_names)
    ds = TextDataset(texts, labels, np.asarray(raw_poison, np.int64), source=path, label_names=names)
    validate(ds, num_labels)
    warn_empty_texts(ds)
    return ds


def read_hf_dataset(
    name_or_path: str,
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    *,
    config_name: str | None = None,
    poison_column: str | None = None,
    num_labels: int | None = None,
) -> TextDataset:
    """Read a Hugging Face ``datasets`` dataset: a local ``save_to_disk`` folder or a hub name (cached/online).

    ``datasets`` is imported lazily. ``ClassLabel`` columns keep their names in ``label_names``; string labels are
    mapped to sorted ids as in :func:`read_table`.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise JdupError(f"the 'datasets' package is needed to read {name_or_path!r} ({e})", name_or_path) from None
    try:
        if os.path.isdir(name_or_path) and (
            os.path.exists(os.path.join(name_or_path, "dataset_info.json"))
            or os.path.exists(os.path.join(name_or_path, "dataset_dict.json"))
            or os.path.exists(os.path.join(name_or_path, "state.json"))
        ):
            d = datasets.load_from_disk(name_or_path)
            if isinstance(d, datasets.DatasetDict):
                if split not in d:
                    raise JdupError(f"split {split!r} not found; splits: {list(d)}", name_or_path)
                d = d[split]
        else:
            d = datasets.load_dataset(name_or_path, config_name, split=split)
    except JdupError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        raise JdupError(f"cannot load the dataset ({type(e).__name__}: {e})", name_or_path) from None
    cols = list(d.column_names)
    missing = [c for c in (text_column, label_column, poison_column) if c and c not in cols]
    if missing:
        raise JdupError(f"missing column(s) {missing}; the dataset has columns {cols}", name_or_path)
    feat = d.features.get(label_column)
    names = tuple(feat.names) if hasattr(feat, "names") else None
    src = f"{name_or_path}[{split}]"
    if names is not None:
        labels, label_names = np.asarray(d[label_column], np.int64), names
    else:
        labels, label_names = _labels_to_ids(list(d[label_column]), src, None)
    poison = np.asarray(d[poison_column], np.int64) if poison_column else np.zeros(len(d), np.int64)
    ds = TextDataset(list(d[text_column]), labels, poison, source=src, label_names=label_names)
    validate(ds, num_labels)
    warn_empty_texts(ds)
    return ds
