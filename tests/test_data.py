"""jdup.data: DUP CSV folders, generic tables, built-in datasets, bucketed encoding, fixed-size batches, errors."""

from __future__ import annotations

import csv
import json
import logging
import types

import numpy as np
import pytest

from jdup import data as D
from jdup.errors import JdupError

# ---------------------------------------------------------------------------------------------------------------
# the DUP authors' SST-2 folder


def test_sst2_badnets_counts_match_spec(sst2_dir):
    splits = D.read_dup_folder(sst2_dir / "badnets", rate=0.2, splits=D.DUP_SPLITS)
    rows = {k: len(v) for k, v in splits.items()}
    assert rows == {
        "train": 6920,
        "train-clean": 6920,
        "train-poison": 6920,
        "dev-clean": 872,
        "dev-poison": 428,
        "test-clean": 1821,
        "test-poison": 912,
        "test-detect": 2733,
    }
    assert int(splits["train"].poison.sum()) == 1384
    assert int(splits["train"].poison[-1384:].sum()) == 1384  # clean rows first, poisoned last
    assert int(splits["test-detect"].poison.sum()) == 912
    assert np.bincount(splits["dev-clean"].labels).tolist() == [428, 444]
    assert (splits["test-poison"].labels == 1).all() and (splits["test-poison"].poison == 1).all()
    # test-detect = test-clean || test-poison
    detect = splits["test-detect"]
    both = D.TextDataset.concat([splits["test-clean"], splits["test-poison"]])
    assert detect.texts == both.texts
    np.testing.assert_array_equal(detect.labels, both.labels)
    np.testing.assert_array_equal(detect.poison, both.poison)
    assert splits["train"].source.endswith("dirty/0.2/train-poison.csv")


def test_read_split_reads_only_what_is_asked(sst2_dir):
    ds = D.read_split(sst2_dir / "badnets", "dev-poison")
    assert len(ds) == 428 and ds.poison.all()
    with pytest.raises(JdupError, match=r"rates present: .*'0.2'"):
        D.read_split(sst2_dir / "badnets", "train", rate=0.3)
    with pytest.raises(JdupError, match="unknown split") as e:
        D.read_split(sst2_dir / "badnets", "validation")
    assert "dev-detect" in str(e.value)  # every split read_split accepts is listed


def test_dev_detect_is_dev_clean_then_dev_poison(sst2_dir):
    folder = sst2_dir / "badnets"
    ds = D.read_split(folder, "dev-detect")
    clean, poison = D.read_split(folder, "dev-clean"), D.read_split(folder, "dev-poison")
    assert ds.texts == clean.texts + poison.texts and len(ds) == 872 + 428
    np.testing.assert_array_equal(ds.poison, np.concatenate([clean.poison, poison.poison]))
    assert ds.source == str(folder / "dev-detect")
    assert set(D.read_dup_folder(folder, splits=("dev-detect",))) == {"dev-detect"}
    with pytest.raises(JdupError, match="not one file"):
        D.split_path(folder, "dev-detect")


def test_data_folder_that_is_a_file_says_so(tmp_path):
    path = _write(tmp_path / "train.csv", ",0,1,2\n0,a,0,0\n")
    for read in (lambda: D.read_split(path, "train"), lambda: D.read_dup_folder(path)):
        with pytest.raises(JdupError, match="is a file, not a data folder") as e:
            read()
        assert e.value.path == str(path) and "not found" not in str(e.value)
    with pytest.raises(JdupError, match="data folder not found"):
        D.read_split(tmp_path / "missing", "train")


def test_empty_texts_are_kept_with_one_warning_naming_the_file(tmp_path, caplog):
    path = _write(tmp_path / "blank.csv", ',0,1,2\n0,,0,0\n1,"  ",1,0\n2,fine,1,0\n')
    with caplog.at_level(logging.WARNING, logger="jdup.data"):
        ds = D.read_dup_csv(path)
    assert ds.texts == ["", "  ", "fine"]
    warned = [r.getMessage() for r in caplog.records if r.name == "jdup.data"]
    assert len(warned) == 1 and str(path) in warned[0] and "2 of 3 rows have an empty text" in warned[0]
    caplog.clear()
    table = _write(tmp_path / "blank.jsonl", '{"text": "", "label": 0}\n{"text": "ok", "label": 1}\n')
    with caplog.at_level(logging.WARNING, logger="jdup.data"):
        assert len(D.read_table(table)) == 2
        D.read_dup_csv(_write(tmp_path / "full.csv", ",0,1,2\n0,a,0,0\n"))  # nothing empty: no warning
    warned = [r.getMessage() for r in caplog.records if r.name == "jdup.data"]
    assert len(warned) == 1 and str(table) in warned[0] and "1 of 2 rows" in warned[0]


def test_dup_csv_roundtrip_with_embedded_newlines_and_quotes(tmp_path):
    ds = D.TextDataset(['a "quoted" text, with comma', "two\nlines\r\nhere", "plain"], [0, 1, 1], [0, 1, 0])
    path = tmp_path / "x.csv"
    D.write_dup_csv(ds, path)
    assert path.read_text().startswith(",0,1,2\n")
    back = D.read_dup_csv(path)
    assert back.texts == ds.texts
    np.testing.assert_array_equal(back.labels, ds.labels)
    np.testing.assert_array_equal(back.poison, ds.poison)
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(path)  # what the DUP code does
    assert frame.values[1][1] == "two\nlines\r\nhere" and list(frame.columns)[1:] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: each raises JdupError naming the file


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        (",0,1,2\n", "empty"),
        ("idx,text,label,poison\n0,hi,1,0\n", "header"),
        (",0,1\n0,hi,1\n", "header"),
        (",0,1,2\n0,hi,pos,0\n", "not an integer"),
        (",0,1,2\n0,hi,0.5,0\n", "not an integer"),
        (",0,1,2\n0,hi,1,maybe\n", "not an integer"),
        (",0,1,2\n0,hi,1\n", "expected 4 fields"),
        (",0,1,2\n0,hi,-1,0\n", "negative label"),
        (",0,1,2\n0,hi,1,3\n", "poison flag"),
    ],
)
def test_bad_dup_csv(tmp_path, content, match):
    path = _write(tmp_path / "bad.csv", content)
    with pytest.raises(JdupError, match=match) as e:
        D.read_dup_csv(path)
    assert e.value.path == str(path) and str(path) in str(e.value)


def test_out_of_range_label_and_missing_file(tmp_path):
    path = _write(tmp_path / "three.csv", ",0,1,2\n0,a,0,0\n1,b,2,0\n")
    assert len(D.read_dup_csv(path)) == 2
    with pytest.raises(JdupError, match="out of range for num_labels=2") as e:
        D.read_dup_csv(path, num_labels=2)
    assert e.value.path == str(path)
    with pytest.raises(JdupError, match="not found") as e:
        D.read_dup_csv(tmp_path / "nope.csv")
    assert e.value.path == str(tmp_path / "nope.csv")
    with pytest.raises(JdupError, match="not found"):
        D.read_dup_folder(tmp_path / "no-folder")
    with pytest.raises(JdupError, match="folder"):
        D.read_dup_csv(tmp_path)


def test_unreadable_file(tmp_path):
    import os

    path = _write(tmp_path / "locked.csv", ",0,1,2\n0,a,0,0\n")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # running as root: permissions are not enforced
            pytest.skip("file permissions are not enforced for this user")
        with pytest.raises(JdupError, match="not readable") as e:
            D.read_dup_csv(path)
        assert e.value.path == str(path)
    finally:
        os.chmod(path, 0o644)


# ---------------------------------------------------------------------------------------------------------------
# generic tables


def test_read_table_csv_tsv_jsonl(tmp_path, synthetic_jsonl):
    ds = D.read_table(synthetic_jsonl)
    assert len(ds) == 200 and ds.label_names == ("neg", "pos") and set(ds.labels.tolist()) == {0, 1}
    assert all(
        ("great" in t or "superb" in t or "lovely" in t or "wonderful" in t or "brilliant" in t) == (y == 1)
        for t, y in zip(ds.texts, ds.labels, strict=True)
    )
    tsv = _write(tmp_path / "x.tsv", "sentence\ty\tp\nhello there\t2\t0\nbye, now\t0\t1\n")
    ds = D.read_table(tsv, "sentence", "y", poison_column="p")
    assert (
        ds.texts == ["hello there", "bye, now"]
        and ds.labels.tolist() == [2, 0]
        and ds.poison.tolist() == [0, 1]
    )
    assert ds.label_names is None
    csvf = tmp_path / "x.csv"
    with open(csvf, "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], ["multi\nline", "spam"], ["b", "ham"], ["c", "spam"]])
    ds = D.read_table(csvf)
    assert (
        ds.texts[0] == "multi\nline" and ds.labels.tolist() == [1, 0, 1] and ds.label_names == ("ham", "spam")
    )
    ds = D.read_table(csvf, label_names=["spam", "ham"])
    assert ds.labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    "name, content, kwargs, match",
    [
        ("a.csv", "sentence,label\nhi,1\n", {}, r"missing column\(s\) \['text'\]"),
        ("b.jsonl", '{"text": "hi", "y": 1}\n', {}, r"missing column\(s\) \['label'\]"),
        ("c.csv", "text,label\nhi,0.5\n", {}, "not an integer"),
        ("d.csv", "text,label\n", {}, "empty"),
        ("e.jsonl", "", {}, "empty"),
        ("f.jsonl", '{"text": "hi", "label": 1}\nnot json\n', {}, "invalid JSON"),
        ("g.csv", "text,label\nhi,5\n", {"num_labels": 3}, "out of range"),
        ("h.csv", "text,label\nhi,a\nyo,b\nho,c\n", {"num_labels": 2}, "3 classes"),
    ],
)
def test_bad_tables(tmp_path, name, content, kwargs, match):
    path = _write(tmp_path / name, content)
    with pytest.raises(JdupError, match=match) as e:
        D.read_table(path, **kwargs)
    assert e.value.path == str(path)


def test_read_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_dict({"sentence": ["a b", "c"], "label": [1, 0]})
    d = d.cast_column("label", datasets.ClassLabel(names=["neg", "pos"]))
    d.save_to_disk(str(tmp_path / "hf"))
    ds = D.read_hf_dataset(str(tmp_path / "hf"), text_column="sentence")
    assert ds.texts == ["a b", "c"] and ds.labels.tolist() == [1, 0] and ds.label_names == ("neg", "pos")
    with pytest.raises(JdupError, match="missing column"):
        D.read_hf_dataset(str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------------------------
# built-in datasets


@pytest.mark.parametrize(
    "name, total, classes", [("movies", 10568, 2), ("sms_spam", 4837, 2), ("trec", 5381, 6)]
)
def test_builtin_sizes_and_splits(name, total, classes):
    s = D.builtin_splits(name, seed=3)
    n = {k: len(v) for k, v in s.items()}
    assert sum(n.values()) == total
    assert abs(n["train"] - 0.8 * total) <= 1 and abs(n["dev"] - 0.1 * total) <= 1
    assert s["train"].num_labels == classes and len(set(s["train"].labels.tolist())) == classes
    assert (
        not set(s["train"].texts) & set(s["test"].texts) or name == "sms_spam"
    )  # sms has duplicate messages
    again = D.builtin_splits(name, seed=3)
    assert again["dev"].texts == s["dev"].texts
    assert D.builtin_splits(name, seed=4)["dev"].texts != s["dev"].texts


def test_builtin_label_meaning():
    movies = D.load_builtin("movies", "train")
    i = movies.texts.index(next(t for t in movies.texts if t.startswith("The Rock is destined")))
    assert movies.labels[i] == 1 and movies.label_names == ("negative", "positive")
    spam = D.builtin_splits("sms_spam")
    assert sum(int(v.labels.sum()) for v in spam.values()) == 638
    with pytest.raises(JdupError, match="unknown built-in"):
        D.builtin_splits("imdb")


# ---------------------------------------------------------------------------------------------------------------
# encoding and batching


def _lengths_dataset(n=37, seed=0):
    rng = np.random.default_rng(seed)
    texts = [" ".join(["word"] * int(k)) for k in rng.integers(1, 90, n)]
    return D.TextDataset(texts, rng.integers(0, 2, n), np.zeros(n))


def test_make_buckets():
    assert D.make_buckets(128) == (32, 64, 128)
    assert D.make_buckets(100) == (32, 64, 100)
    assert D.make_buckets(16) == (16,)
    assert D.make_buckets(512, (8, 600)) == (8, 512)


def test_encode_buckets_bound_shapes(minilm_tokenizer):
    ds = _lengths_dataset()
    enc = D.encode(minilm_tokenizer, ds, max_length=64)
    assert enc.buckets == (32, 64) and enc.input_ids.shape == (37, 64)
    assert enc.num_truncated == int((enc.lengths == 64).sum()) > 0
    np.testing.assert_array_equal(enc.attention_mask.sum(1), enc.lengths)
    assert (enc.input_ids[:, 0] == minilm_tokenizer.cls_token_id).all()
    shapes = set()
    for bs in (4, 5):
        for shuffle in (False, True):
            shapes |= {b["input_ids"].shape for b in D.batches(enc, bs, shuffle=shuffle)}
    assert {s[1] for s in shapes} <= set(enc.buckets) and len(shapes) <= 2 * len(enc.buckets)
    # capped by the model's position limit
    cfg = types.SimpleNamespace(max_position_embeddings=40, arch="bert")
    assert D.encode(minilm_tokenizer, ds, max_length=512, config=cfg).buckets == (32, 40)


def test_batches_fixed_size_valid_mask_and_index(minilm_tokenizer):
    ds = _lengths_dataset(n=23)
    enc = D.encode(minilm_tokenizer, ds, max_length=128)
    for kw in (
        {},
        {"shuffle": True, "seed": 1},
        {"sort_by_length": True},
        {"sort_by_length": True, "shuffle": True},
    ):
        seen = []
        for b in D.batches(enc, 5, **kw):
            assert b["input_ids"].shape[0] == 5 and b["valid"].shape == (5,) and b["index"].shape == (5,)
            # the batch length is the smallest bucket that holds its longest row
            assert b["input_ids"].shape[1] == enc.bucket_for(int(b["attention_mask"].sum(1).max()))
            assert (b["index"][~b["valid"]] == -1).all()
            rows = b["index"][b["valid"]]
            np.testing.assert_array_equal(b["labels"][b["valid"]], enc.labels[rows])
            np.testing.assert_array_equal(
                b["input_ids"][b["valid"]], enc.input_ids[rows, : b["input_ids"].shape[1]]
            )
            assert (b["attention_mask"].sum(1) > 0).all()  # padding rows are real rows, never all-padding
            seen.extend(rows.tolist())
        assert sorted(seen) == list(range(23))
    assert sum(b["valid"].sum() for b in D.batches(enc, 5, drop_last=True)) == 20
    a = [b["index"] for b in D.batches(enc, 5, shuffle=True, seed=2, epoch=1)]
    b = [b["index"] for b in D.batches(enc, 5, shuffle=True, seed=2, epoch=1, start=2)]
    assert all((x == y).all() for x, y in zip(a[2:], b, strict=True)) and len(b) == len(a) - 2
    c = [b["index"] for b in D.batches(enc, 5, shuffle=True, seed=2, epoch=2)]
    assert any((x != y).any() for x, y in zip(a, c, strict=True))
    assert D.num_batches(23, 5) == 5 and D.num_batches(23, 5, drop_last=True) == 4


def test_pad_id_falls_back_to_eos():
    tok = types.SimpleNamespace(pad_token_id=None, eos_token_id=7)
    assert D.pad_token_id(tok) == 7
    assert D.pad_token_id(types.SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0

    class DecoderTok:  # no pad token; token_type_ids absent
        pad_token_id = None
        eos_token_id = 2
        model_max_length = 1 << 60

        def __call__(self, texts, truncation, max_length, padding, add_special_tokens):
            ids = [[5 + len(w) for w in t.split()][:max_length] for t in texts]
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    enc = D.encode(DecoderTok(), D.TextDataset(["a bb", "ccc"], [0, 1], [0, 0]), max_length=8)
    assert enc.pad_id == 2 and enc.input_ids.tolist()[1] == [8, 2, 2, 2, 2, 2, 2, 2]
    assert enc.lengths.tolist() == [2, 1] and (enc.token_type_ids == 0).all()


def test_jsonl_rows_must_be_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps([1, 2]) + "\n")
    with pytest.raises(JdupError, match="JSON object"):
        D.read_table(path)


def test_length_grouping_reduces_padding(minilm_tokenizer):
    ds = _lengths_dataset(n=400, seed=1)
    enc = D.encode(minilm_tokenizer, ds, max_length=128, buckets=(16, 32, 64, 128))

    def padded(**kw):
        return sum(b["input_ids"].size for b in D.batches(enc, 8, shuffle=True, seed=0, **kw))

    assert padded(sort_by_length=True) < 0.8 * padded()
    e0 = [b["index"] for b in D.batches(enc, 8, shuffle=True, seed=0, epoch=0, sort_by_length=True)]
    e1 = [b["index"] for b in D.batches(enc, 8, shuffle=True, seed=0, epoch=1, sort_by_length=True)]
    again = [b["index"] for b in D.batches(enc, 8, shuffle=True, seed=0, epoch=0, sort_by_length=True)]
    assert all((a == b).all() for a, b in zip(e0, again, strict=True))
    assert {tuple(sorted(x)) for x in e0} != {tuple(sorted(x)) for x in e1}  # batch composition changes too
