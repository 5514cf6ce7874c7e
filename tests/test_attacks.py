"""jdup.attacks (trigger functions, dirty-label poisoning, in memory) and the DUP folder layout written by the
poison stage (jdup.stages.poison.run_poison)."""

from __future__ import annotations

import filecmp
import json
import os
import random

import numpy as np
import pytest

from jdup import attacks as A
from jdup import data as D
from jdup.errors import JdupError
from jdup.stages import poison as P


def test_badnets_inserts_trigger_words():
    rng = random.Random(0)
    text = "the story bogs down in a mess of purposeless violence ."
    for n in (1, 3):
        out = A.badnets(text, rng, num_triggers=n)
        words = out.split()
        assert len(words) == len(text.split()) + n
        assert sum(w in A.BADNETS_TRIGGERS for w in words) == n
        assert [w for w in words if w not in A.BADNETS_TRIGGERS] == text.split()  # order kept
    positions = {
        A.badnets("a b c", random.Random(s))
        .split()
        .index(next(w for w in A.badnets("a b c", random.Random(s)).split() if w in A.BADNETS_TRIGGERS))
        for s in range(60)
    }
    assert positions == {0, 1, 2, 3}  # every word position, start and end included
    assert A.badnets("", random.Random(0)) in A.BADNETS_TRIGGERS


def test_addsent_inserts_the_sentence_as_a_block():
    text = "complete lack of originality , cleverness or even visible effort"
    for s in range(20):
        out = A.addsent(text, random.Random(s))
        assert A.ADDSENT_SENTENCE in out
        assert out.replace(A.ADDSENT_SENTENCE, " ").split() == text.split()
    assert A.make_attack("addsent", sentence="zz top")("a b", random.Random(0)).count("zz top") == 1
    with pytest.raises(JdupError, match="unknown attack"):
        A.make_attack("stylebkd")


def _clean(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return D.TextDataset(
        [f"text number {i} here" for i in range(n)], rng.integers(0, 3, n), np.zeros(n), "clean"
    )


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3])
def test_poison_splits_properties(rate):
    train, dev, test = _clean(100, 0), _clean(30, 1), _clean(40, 2)
    target = 2
    s = A.poison_splits(train, dev, test, A.make_attack("badnets"), rate=rate, target=target, seed=5)
    dirty = s["dirty"]
    k = int(rate * len(train))
    assert len(dirty) == len(train) and int(dirty.poison.sum()) == k
    assert (dirty.poison[-k:] == 1).all() and (dirty.poison[:-k] == 0).all()  # clean rows first
    assert (dirty.labels[-k:] == target).all()
    assert all(any(w in A.BADNETS_TRIGGERS for w in t.split()) for t in dirty.texts[-k:])
    # the poisoned rows come from non-target rows only, and are the train-poison versions of those rows
    chosen = A.choose_poison_rows(train.labels, rate, target, 5)
    assert (train.labels[chosen] != target).all()
    assert dirty.texts[-k:] == [s["train-poison"].texts[i] for i in chosen]
    keep = np.setdiff1d(np.arange(len(train)), chosen)
    assert dirty.texts[:-k] == [train.texts[i] for i in keep]
    np.testing.assert_array_equal(dirty.labels[:-k], train.labels[keep])
    # full copies and evaluation splits
    tp = s["train-poison"]
    assert len(tp) == len(train) and (tp.labels == target).all() and tp.poison.all()
    assert (
        len(s["dev-poison"]) == int((dev.labels != target).sum()) and (s["dev-poison"].labels == target).all()
    )
    assert len(s["test-poison"]) == int((test.labels != target).sum())
    assert s["test-detect"].texts == test.texts + s["test-poison"].texts
    assert s["test-detect"].poison.tolist() == [0] * len(test) + [1] * len(s["test-poison"])


def test_rate_larger_than_non_target_rows_raises():
    train = D.TextDataset(["a"] * 10, [1] * 8 + [0] * 2, np.zeros(10), "tiny.csv")
    with pytest.raises(JdupError, match="asks for 3 poisoned rows but only 2") as e:
        A.choose_poison_rows(train.labels, 0.3, 1, 0, train.source)
    assert e.value.path == "tiny.csv"
    assert len(A.choose_poison_rows(train.labels, 0.2, 1, 0)) == 2


def test_run_poison_writes_readable_dup_folder(synthetic_dup):
    names = sorted(os.listdir(synthetic_dup))
    assert names == sorted(
        [
            "train-clean.csv",
            "train-poison.csv",
            "dirty",
            "dev-clean.csv",
            "dev-poison.csv",
            "test-clean.csv",
            "test-poison.csv",
            "test-detect.csv",
            "poison_config.json",
            "metrics.json",
            "manifest.json",
        ]
    )
    assert not any(".tmp-" in n or n.endswith(".partial") for n in os.listdir(synthetic_dup.parent))
    splits = D.read_dup_folder(synthetic_dup, rate=0.2, splits=D.DUP_SPLITS, num_labels=2)
    assert len(splits["train"]) == 160 and int(splits["train"].poison.sum()) == 32
    assert (splits["train"].labels[-32:] == 1).all()
    meta = json.loads((synthetic_dup / "poison_config.json").read_text())
    assert meta["target"] == 1 and meta["label_names"] == ["neg", "pos"] and meta["poisoned_train_rows"] == 32
    with open(synthetic_dup / "dev-poison.csv") as f:
        assert f.readline() == ",0,1,2\n"


def test_run_poison_is_deterministic_per_seed(tmp_path, synthetic_jsonl):
    def run(seed, name, attack="badnets"):
        out = tmp_path / name
        P.run_poison(P.PoisonConfig(source=str(synthetic_jsonl), out=str(out), seed=seed, attack=attack))
        return out

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    files = ["dirty/0.2/train-poison.csv", "train-poison.csv", "dev-poison.csv", "test-detect.csv"]
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert not any(filecmp.cmp(a / f, c / f, shallow=False) for f in files)
    d = run(1, "d", attack="addsent")
    assert all(A.ADDSENT_SENTENCE in t for t in D.read_split(d, "test-poison").texts)
    # rerunning into a previous jdup poison folder replaces it; a foreign folder is refused
    P.run_poison(P.PoisonConfig(source=str(synthetic_jsonl), out=str(a), seed=2))
    assert filecmp.cmp(a / files[0], c / files[0], shallow=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(JdupError, match="not a jdup poison output"):
        P.run_poison(P.PoisonConfig(source=str(synthetic_jsonl), out=str(tmp_path / "foreign")))


def test_run_poison_builtin_and_errors(tmp_path, synthetic_jsonl):
    r = P.run_poison(
        P.PoisonConfig(
            source="builtin:trec", out=str(tmp_path / "trec"), target=0, max_rows=120, attack="addsent"
        )
    )
    assert r["num_labels"] == 6 and r["counts"]["train-clean"] == 120 and r["poisoned_train_rows"] == 24
    with pytest.raises(JdupError, match="target label 6 is out of range"):
        P.run_poison(P.PoisonConfig(source="trec", out=str(tmp_path / "x"), target=6, max_rows=50))
    with pytest.raises(JdupError, match="lower the rate"):
        P.run_poison(P.PoisonConfig(source=str(synthetic_jsonl), out=str(tmp_path / "y"), rate=0.9))
    with pytest.raises(JdupError, match="not found") as e:
        P.run_poison(P.PoisonConfig(source=str(tmp_path / "missing.csv"), out=str(tmp_path / "z")))
    assert "missing.csv" in str(e.value)
    with pytest.raises(JdupError, match="missing column"):
        P.run_poison(
            P.PoisonConfig(source=str(synthetic_jsonl), out=str(tmp_path / "w"), text_column="sentence")
        )
    assert not any(n.startswith(("x", "y", "z", "w")) for n in os.listdir(tmp_path))


def test_attacks_is_in_memory_and_the_stage_names_live_in_the_stage():
    import subprocess
    import sys

    code = "import sys, jdup.attacks; assert 'jdup.stages.poison' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert callable(P.run_poison) and P.PoisonConfig.__module__ == "jdup.stages.poison"
    for name in ("run_poison", "PoisonConfig", "load_clean_source", "write_dup_folder"):
        assert not hasattr(A, name), name
