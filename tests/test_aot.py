"""jdup.aot: executables of the feature forward kept across processes, with bit-identical results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jdup import runtime
    runtime.setup(cache_dir=sys.argv[2])
    from jdup import features, models
    model = models.from_pretrained(sys.argv[1])
    fn, state = features.make_batch_fn(model, pooling="cls")
    rng = np.random.default_rng(0)
    before = runtime.compile_totals()
    outs = []
    for length in (16, 24, 16):  # two shapes, one of them twice
        ids = rng.integers(5, 1000, (4, length)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        outs.append(np.asarray(fn(state, batch, None)["features"]).tolist())
    from jdup import data, predict
    ds = data.TextDataset(["a fine movie", "awful , really bad acting and a plot that goes nowhere"] * 3, [0, 1] * 3,
                          [0, 0] * 3, "t")
    enc = data.encode(models.load_tokenizer(sys.argv[1]), ds, 64, config=model.config)
    outs.append(predict.predict(model, enc, 4).tolist())  # the evaluation / teacher forward
    print(json.dumps({"outs": outs, "compile": runtime.compile_since(before)}))
    """
)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A copy of the package: the file names hash jdup's source, which must not change between the children
    (other work on the checkout would make every child compile afresh)."""
    out = tmp_path_factory.mktemp("src")
    shutil.copytree(REPO / "jdup", out / "jdup", ignore=shutil.ignore_patterns("__pycache__"))
    return out


def _child(model: Path, cache: Path, src: Path, keep: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JDUP_COMPILATION_CACHE", "JDUP_KEEP"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(src))
    if not keep:
        env["JDUP_KEEP_EXECUTABLES"] = "0"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(cache)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_forward_without_tracing_it(tiny_model_dir, tmp_path, src):
    cache = tmp_path / "xla"
    first = _child(tiny_model_dir, cache, src)
    files = sorted((cache / "aot").glob("*.exe"))
    assert len(files) == 3  # one executable per input shape of the feature forward, one of the logits forward
    second = _child(tiny_model_dir, cache, src)
    plain = _child(tiny_model_dir, tmp_path / "other", src, keep=False)
    assert not (tmp_path / "other" / "aot").exists()
    # the compilation cache already holds the programs (written by a process that did not keep them, as an older
    # jdup version would have): a kept program is compiled without looking there (XLA:CPU serialises an executable
    # loaded from the cache incompletely: running it in a later process failed with "Function ... not found"),
    # so it is kept, and the process after it loads and runs it
    hit = _child(tiny_model_dir, tmp_path / "other", src)
    assert len(list((tmp_path / "other").glob("aot/*.exe"))) == 3
    after_hit = _child(tiny_model_dir, tmp_path / "other", src)
    for got in (second, plain, hit, after_hit):  # the same binary or a fresh compilation: identical numbers
        for a, b in zip(first["outs"], got["outs"], strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the loaded forward is neither traced nor lowered again: fewer programs compiled or looked up
    for loaded in (second, after_hit):
        assert loaded["compile"]["programs"] <= first["compile"]["programs"] - 3
        assert loaded["compile"]["trace_s"] < first["compile"]["trace_s"]


@pytest.mark.slow
def test_a_damaged_file_is_removed(tiny_model_dir, tmp_path, src):
    cache = tmp_path / "xla"
    first = _child(tiny_model_dir, cache, src)
    for f in (cache / "aot").glob("*.exe"):
        f.write_bytes(b"not an executable")
    again = _child(tiny_model_dir, cache, src)
    for a, b in zip(first["outs"], again["outs"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the damaged files were removed and replaced by fresh compilations (not the compilation cache's copies)
    files = list((cache / "aot").glob("*.exe"))
    assert len(files) == 3 and all(f.stat().st_size > 100 for f in files)
    third = _child(tiny_model_dir, cache, src)
    for a, b in zip(first["outs"], third["outs"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
