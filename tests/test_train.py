"""jdup.train (in-memory training, schedule), jdup.stages.train (the stage), jdup.checkpoint (exact resume)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdup import data as D
from jdup import optim
from jdup import train as T
from jdup.checkpoint import Checkpointer
from jdup.errors import JdupError
from jdup.stages import train as ST

# One setting shared by every training run here, so the train step compiles once per test session.
# group_by_length exercises the length-grouped order (and its mid-epoch resume); plain shuffling is covered in
# tests/test_data.py.
RUN = dict(epochs=4, batch_size=16, lr=1e-2, warmup=0.1, max_length=32, progress=False, log_every=1, seed=3,
           group_by_length=True)


def _cfg(model_dir, data_dir, out, **kw):
    return T.TrainConfig(model=str(model_dir), data=str(data_dir), out=str(out), **{**RUN, **kw})


def _safetensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, synthetic_dup):
    out = tmp_path_factory.mktemp("train") / "full"
    return out, ST.run_train(_cfg(tiny_model_dir, synthetic_dup, out, ckpt_every_steps=0))


# ---------------------------------------------------------------------------------------------------------------


def test_linear_warmup_decay_matches_hf():
    s = optim.linear_warmup_decay(2e-5, 50, 30)
    ours = np.array([float(s(t)) for t in range(52)])
    expected = np.array([2e-5 * (t / 30 if t < 30 else max(0.0, (50 - t) / 20)) for t in range(52)])
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-12)
    assert ours[0] == 0.0 and ours[30] == pytest.approx(2e-5) and ours[50] == 0.0
    assert float(optim.linear_warmup_decay(1.0, 10, 0)(0)) == 1.0
    assert optim.schedule_value(2e-5, 50, 30, 40) == pytest.approx(float(s(40)))
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = transformers.get_linear_schedule_with_warmup(opt, 30, 50)
    hf = []
    for _ in range(52):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, hf, rtol=1e-5, atol=1e-12)


def test_metrics():
    assert T.accuracy([1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    assert T.attack_success_rate(np.array([1, 1, 0, 1]), 1) == 0.75
    assert T.accuracy([], []) == 0.0 and T.attack_success_rate([], 1) == 0.0


@pytest.mark.slow
def test_predict_keeps_dataset_order(minilm_tokenizer):
    from jdup import models

    model = models.tiny_model("bert", 2, seed=1)
    texts = [" ".join(["word"] * k) + f" end {k}" for k in (3, 40, 1, 17, 60, 5, 33)]
    enc = D.encode(minilm_tokenizer, D.TextDataset(texts, [0] * 7, [0] * 7), max_length=64)
    logits = T.predict(model, enc, batch_size=3)
    assert logits.shape == (7, 2) and logits.dtype == np.float32
    direct = model(
        jnp.asarray(enc.input_ids), jnp.asarray(enc.attention_mask), jnp.asarray(enc.token_type_ids)
    )
    np.testing.assert_allclose(logits, np.asarray(direct.logits), atol=1e-5)


@pytest.mark.slow
def test_training_learns_task_and_backdoor(full_run):
    out, r = full_run
    for key in ("cacc", "asr", "dev_acc", "epochs", "seconds"):
        assert key in r
    assert r["epochs"] == 4 and r["steps"] == 40 and len(r["history"]) == 4
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert r["cacc"] >= 0.8 and r["asr"] >= 0.8
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["cacc"] == r["cacc"] and saved["best_epoch"] == r["best_epoch"]
    assert not (out / "ckpt").exists()
    # the exported model reloads and reproduces the reported clean accuracy
    from jdup import models

    model = models.from_pretrained(out / "model")
    tok = models.load_tokenizer(out / "model")
    data_dir = r["config"]["data"]
    enc = D.encode(tok, D.read_split(data_dir, "test-clean"), 32)
    preds = T.predict(model, enc).argmax(-1)
    assert T.accuracy(preds, enc.labels) == pytest.approx(r["cacc"])


@pytest.mark.slow
def test_resume_after_stop_matches_uninterrupted(full_run, tmp_path, tiny_model_dir, synthetic_dup):
    full_out, full = full_run
    out = tmp_path / "resumed"
    first = ST.run_train(_cfg(tiny_model_dir, synthetic_dup, out, ckpt_every_steps=4, max_steps=13))
    ckpt = Path(f"{out}.partial") / "ckpt"  # an unfinished run lives in <out>.partial until it completes
    assert first.stopped and first.out is None
    assert first.record == {"stopped": True, "step": 13, "total_steps": 40, "checkpoint": str(ckpt)}
    assert not (out / "metrics.json").exists() and not (out / "model").exists()
    with Checkpointer(ckpt) as ck:
        assert ck.latest_step() == 13 and 12 in ck.all_steps()
    second = ST.run_train(_cfg(tiny_model_dir, synthetic_dup, out, ckpt_every_steps=0))  # may change on resume
    assert second["steps"] == 40
    assert [h["dev_acc"] for h in second["history"]] == [h["dev_acc"] for h in full["history"]]
    a, b = _safetensors(full_out / "model"), _safetensors(out / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert second["cacc"] == full["cacc"] and second["asr"] == full["asr"]


@pytest.mark.slow
def test_in_memory_train_is_the_stage_without_files(full_run, tiny_model_dir, synthetic_dup):
    """jdup.train.train on the splits the stage reads gives the stage's trajectory and selected weights exactly,
    takes the settings only (no path), and leaves the caller's model as it was."""
    from jdup import models

    _, full = full_run
    cfg = _cfg(tiny_model_dir, synthetic_dup, "unused", ckpt_every_steps=0)
    settings = cfg.settings()
    assert type(settings) is T.TrainSettings and not hasattr(settings, "out") and not hasattr(settings, "data")
    splits = D.read_dup_folder(str(synthetic_dup), cfg.rate, ("train",) + T.EVAL_SPLITS, num_labels=2)
    model = models.from_pretrained(str(tiny_model_dir), num_labels=2, seed=settings.seed)
    tok = models.load_tokenizer(str(tiny_model_dir))
    enc = {k: D.encode(tok, v, settings.max_length, settings.buckets, config=model.config) for k, v in splits.items()}
    before = jax.device_get(nnx_params(model))
    records = []
    res = T.train(model, enc, cfg, target=full["target"], on_record=records.append)  # a TrainConfig is reduced
    assert isinstance(res, T.TrainResult) and not res.stopped and res.checkpoint is None
    assert res.steps == full["steps"] and res.best_epoch == full["best_epoch"]
    assert res.history == full["history"]
    assert res.metrics["cacc"] == full["cacc"] and res.metrics["asr"] == full["asr"]
    assert sum("loss" in r for r in records) == 40 and sum(bool(r.get("eval")) for r in records) == 4
    after = jax.device_get(nnx_params(model))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    logits = T.predict(res.model, enc["test-clean"])
    assert T.accuracy(logits.argmax(-1), enc["test-clean"].labels) == pytest.approx(full["cacc"])


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


@pytest.mark.slow
def test_resume_refuses_changed_settings(tmp_path, tiny_model_dir, synthetic_dup):
    out = tmp_path / "run"
    ST.run_train(_cfg(tiny_model_dir, synthetic_dup, out, max_steps=2, ckpt_every_steps=0))
    with pytest.raises(JdupError, match="different settings"):
        ST.run_train(_cfg(tiny_model_dir, synthetic_dup, out, lr=5e-3))


def test_bad_training_inputs(tmp_path, tiny_model_dir, synthetic_dup):
    import shutil

    bad = tmp_path / "three-classes"
    shutil.copytree(synthetic_dup, bad)
    path = bad / "test-clean.csv"
    text = path.read_text().splitlines()
    text[1] = text[1].rsplit(",", 2)[0] + ",2,0"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(JdupError, match="out of range for num_labels=2") as e:
        ST.run_train(_cfg(tiny_model_dir, bad, tmp_path / "o1"))
    assert e.value.path == str(path)
    with pytest.raises(JdupError, match="num_labels=3 does not match"):
        ST.run_train(_cfg(tiny_model_dir, bad, tmp_path / "o2", num_labels=3))
    with pytest.raises(JdupError, match="not found"):
        ST.run_train(_cfg(tiny_model_dir, tmp_path / "nowhere", tmp_path / "o3"))
    with pytest.raises(JdupError, match="rates present"):
        ST.run_train(_cfg(tiny_model_dir, synthetic_dup, tmp_path / "o4", rate=0.1))
    with pytest.raises(JdupError, match="select"):
        ST.run_train(_cfg(tiny_model_dir, synthetic_dup, tmp_path / "o5", select="best"))


def test_checkpointer_roundtrip_and_mismatch(tmp_path):
    import optax

    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
    opt = optax.adam(1e-3).init(params)
    host = jax.device_get(params)
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ck:
        assert ck.latest_step() is None
        for step in (1, 2, 3):
            ck.save(step, (params, opt, host), {"step": step, "note": "x"})
        assert ck.all_steps() == [2, 3]
        (p2, o2, h2), meta = ck.restore((params, opt, host))
    assert meta == {"step": 3, "note": "x"}
    np.testing.assert_array_equal(p2["w"], params["w"])
    assert isinstance(h2["w"], np.ndarray) and isinstance(p2["w"], jax.Array)
    assert jax.tree.structure(o2) == jax.tree.structure(opt)
    with Checkpointer(tmp_path / "ck") as ck, pytest.raises(JdupError, match="does not match"):
        ck.restore(({"w": params["w"]}, opt, host))
    with Checkpointer(tmp_path / "empty") as ck, pytest.raises(JdupError, match="no checkpoint"):
        ck.restore(params)
