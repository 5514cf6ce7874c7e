"""jdup.mesh: mesh specs, padding, placement, and every pass on a simulated 4- and 8-device mesh equal to one device.

The multi-device checks run in a subprocess (the device count is fixed before JAX starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=N``); one subprocess runs all the checks of one device count,
each comparing a mesh (``auto``, ``2x2``, ``2x4``) with the one-device mesh ``1`` on a tiny random BERT.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from jdup import mesh as jmesh
from jdup.errors import Invalid

# ---------------------------------------------------------------------------------------------------------------
# one device (in process)


def test_specs_and_records_on_one_device():
    m = jmesh.make_mesh("1")
    assert tuple(m.axis_names) == ("data", "model")
    assert jmesh.mesh_record(m) == {"data": 1, "model": 1} == jmesh.mesh_record(None)
    assert jmesh.make_mesh(m) is m
    for bad in ("2by2", "0x4", "x2", "auto2"):
        with pytest.raises(Invalid, match="mesh: must be|mesh: sizes"):
            jmesh.make_mesh(bad)
    with pytest.raises(Invalid, match=r"mesh: 2x4 needs 8 devices but 1 are visible"):
        jmesh.make_mesh("2x4")


def test_dropout_bits_of_real_rows_ignore_padding_and_layout():
    """What makes dropout masks mesh-independent: JAX's partitionable threefry (on by default) draws the same bits
    for a row whatever rows follow it (padding) and however the rows are split."""
    import jax

    assert jax.config.jax_threefry_partitionable
    key = jax.random.key(3)
    a = np.asarray(jax.random.bernoulli(key, 0.9, (5, 3, 7)))
    b = np.asarray(jax.random.bernoulli(key, 0.9, (8, 3, 7)))
    np.testing.assert_array_equal(a, b[:5])
    assert not a.all()


def test_pad_rows_marks_copies_invalid():
    b = {"ids": np.arange(10).reshape(5, 2), "valid": np.ones(5, bool), "index": np.arange(5)}
    p, n = jmesh.pad_rows(b, 4)
    assert n == 5 and p["ids"].shape == (8, 2)
    np.testing.assert_array_equal(p["ids"][5:], np.repeat(b["ids"][:1], 3, axis=0))
    assert p["valid"].tolist() == [True] * 5 + [False] * 3 and p["index"][5:].tolist() == [-1] * 3
    assert b["valid"].all()  # the input is not modified
    same, n = jmesh.pad_rows(b, 5)
    assert same is b and n == 5


def test_put_rows_and_gather_round_trip():
    m = jmesh.make_mesh("1")
    x = {"a": np.arange(12, dtype=np.float32).reshape(4, 3)}
    g = jmesh.put_rows(x, m)
    assert g["a"].sharding.spec[0] == "data"
    np.testing.assert_array_equal(jmesh.gather(g)["a"], x["a"])


# ---------------------------------------------------------------------------------------------------------------
# several simulated devices (subprocess)


#: What XLA:CPU prints when it aborts a process whose simulated devices never all reached a collective. On a
#: 2-core machine with another busy process beside it (pytest-xdist), the in-process communicator of simulated CPU
#: devices can deadlock (one device's program never gets a thread while the others block in the collective); the
#: same check passes when run again. Real accelerators have no such thread pool; such a run is retried once.
XLA_CPU_RENDEZVOUS_ABORT = "Termination timeout for"


def _run(n_devices: int, checks: str, timeout: int = 900) -> str:
    # imported here, not at the top: this file is also the subprocess's script
    from tests.helpers.subproc import xla_flags

    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(n_devices)
    env["JAX_PLATFORMS"] = "cpu"
    for attempt in range(2):
        r = subprocess.run(
            [sys.executable, __file__, str(n_devices), checks],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        if r.returncode == 0 or XLA_CPU_RENDEZVOUS_ABORT not in r.stderr or attempt:
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r.stdout


def test_passes_on_4_devices_equal_one_device():
    """``auto`` (4x1) and ``2x2``: predict, features, detection; batches of 6 rows (not a multiple of 4)."""
    out = _run(4, "predict,detect")
    assert out.count("OK ") == 2, out


@pytest.mark.slow
def test_train_on_4_devices_equals_one_device():
    """Victim training on ``auto`` and ``2x2`` (dropout on, a last batch of 4 rows)."""
    out = _run(4, "train")
    assert out.count("OK ") == 1, out


@pytest.mark.slow
def test_unlearn_on_4_devices_equals_one_device():
    """Unlearning on ``auto`` and, with the gradient projection, on ``2x2`` (5 + 5 rows a step: padded to 12 on
    4 devices)."""
    out = _run(4, "unlearn")
    assert out.count("OK ") == 1, out


@pytest.mark.slow
def test_a_2x4_mesh_equals_one_device():
    """8 devices as 2 x 4 (weights split four ways): predict, features, detection (training's and unlearning's
    tensor-parallel case is the 2x2 mesh above; ``python tests/test_mesh.py 8 train,unlearn`` runs them on 2x4)."""
    out = _run(8, "predict,detect")
    assert out.count("OK ") == 2, out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _two_processes(mode: str, out: str) -> None:
    """Runs ``_main_process(mode)`` in two local processes of 2 simulated devices each, joined on a free port."""
    from tests.helpers.subproc import xla_flags  # (see _run)

    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(2)
    env["JAX_PLATFORMS"] = "cpu"
    port = str(_free_port())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen([sys.executable, __file__, "mp", str(i), port, out, mode], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (o, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-2000:] + err[-4000:]


@pytest.mark.slow
def test_two_processes_on_a_2x2_mesh_equal_one_device(tmp_path):
    """Two local processes with 2 devices each, joined by ``jax.distributed``: a 2x2 mesh over both; predictions
    and features come back whole on each process and equal one device's."""
    _two_processes("predict", str(tmp_path))
    from jdup import data, features, models, predict

    enc = _encoded(data, models)
    model = models.tiny_model("bert", 2, seed=0)
    ref = predict.predict(model, enc, 3)
    ref_f = features.extract_features(model, enc, 3, progress=False)["features"]
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"logits_{i}.npy"), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"features_{i}.npy"), ref_f, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_processes_train_and_unlearn_equal_one_device(tmp_path):
    """Victim training and unlearning with ``mesh=auto`` over two processes (4 devices): the same losses and
    weights as one device, on each process."""
    import jax

    _two_processes("train", str(tmp_path))
    ref_losses, ref_params, _ = _train_once("1")
    ref_unlearn, _, _ = _unlearn_once("1", "none")
    ref = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref_params)])
    for i in range(2):
        got = np.load(tmp_path / f"train_{i}.npz")
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["unlearn_losses"], ref_unlearn, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["params"], ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the checks (run as a script in the subprocesses above)

TEXTS = [
    "a great film with lovely music",
    "dull",
    "the plot was awful and the ending long",
    "superb",
    "it was a boring story of old actors and new scenes that went on",
    "wonderful acting",
    "terrible",
    "the director made a brilliant short movie",
    "dreadful scenes",
    "lovely",
    "a long story",
    "awful music in an old film",
    "new",
]


def _meshes(n: int) -> list[str]:
    return ["auto", "2x2"] if n == 4 else ["2x4"]


def _data(n_rows: int, seed: int = 0):
    from jdup import data

    rng = np.random.default_rng(seed)
    texts = [TEXTS[i % len(TEXTS)] + (" extra" * int(rng.integers(0, 4))) for i in range(n_rows)]
    labels = np.arange(n_rows) % 2
    return data.TextDataset(texts, labels, np.zeros(n_rows, np.int8), source="synthetic")


def _check_predict(n: int) -> None:
    from jdup import data, features, models, predict

    model = models.tiny_model("bert", 2, seed=0)
    tok = models.load_tokenizer("builtin:minilm")
    enc = data.encode(tok, _data(13), max_length=32, buckets=(8, 16, 32))
    one = jmesh.make_mesh("1")
    ref = predict.predict(model, enc, 6, mesh=one)
    ref_f = features.extract_features(model, enc, 6, progress=False, mesh=one)
    for spec in _meshes(n):
        mesh = jmesh.make_mesh(spec)
        m = jmesh.put_model(models.tiny_model("bert", 2, seed=0), mesh)
        got = predict.predict(m, enc, 6, mesh=mesh)
        assert got.shape == ref.shape == (13, 2)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        f = features.extract_features(m, enc, 6, progress=False, mesh=mesh)
        np.testing.assert_allclose(f["features"], ref_f["features"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f["logits"], ref_f["logits"], rtol=1e-5, atol=1e-5)
    print("OK predict")


def _check_detect(n: int) -> None:
    from jdup import detect, models

    tok = models.load_tokenizer("builtin:minilm")
    calib, scored = _data(48, 1), _data(30, 2)
    cfg = detect.DetectSettings(method="dup", batch_size=6, max_length=32, buckets=(16, 32), progress=False)
    ref = detect.detect(models.tiny_model("bert", 2, seed=0), tok, calib, scored, cfg, mesh=jmesh.make_mesh("1"))
    for spec in _meshes(n):
        mesh = jmesh.make_mesh(spec)
        model = jmesh.put_model(models.tiny_model("bert", 2, seed=0), mesh)
        got = detect.detect(model, tok, calib, scored, cfg, mesh=mesh)
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got.flags, ref.flags)
        assert got.threshold == pytest.approx(ref.threshold, rel=1e-4, abs=1e-4)
    print("OK detect")


def _train_once(spec: str):
    """A few victim-training steps of a tiny BERT (dropout on, a last batch of 4 rows) on mesh ``spec``."""
    from flax import nnx

    from jdup import data, models, train
    from jdup.settings import TrainSettings

    mesh = jmesh.make_mesh(spec)
    tok = models.load_tokenizer("builtin:minilm")
    enc = {k: data.encode(tok, _data(n_rows, seed), max_length=32, buckets=(32,))
           for k, n_rows, seed in (("train", 22, 3), ("dev-clean", 8, 4))}  # fmt: skip
    settings = TrainSettings(epochs=2, batch_size=6, lr=1e-3, warmup=0.0, max_length=32, buckets=(32,),
                             eval_batch_size=6, log_every=1, ckpt_every_steps=0, progress=False)  # fmt: skip
    records: list = []
    model = models.tiny_model("bert", 2, seed=0)
    assert model.config.hidden_dropout_prob > 0  # the masks are part of what is compared
    res = train.train(jmesh.put_model(model, mesh), enc, settings, target=1, mesh=mesh, on_record=records.append)
    losses = [r["loss"] for r in records if "loss" in r]
    params = nnx.state(res.model, nnx.Param)
    return losses, jmesh.gather(params), res


def _check_train(n: int) -> None:
    import jax

    ref_losses, ref_params, _ = _train_once("1")
    assert len(ref_losses) == 8
    for spec in _meshes(n):
        losses, params, res = _train_once(spec)
        leaf = jax.tree.leaves(nnx_params(res.model))[0]
        assert leaf.sharding.device_set == set(jmesh.make_mesh(spec).devices.flat), leaf.sharding
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
        a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in (params, ref_params))
        diff = np.abs(a - b)
        # AdamW divides by sqrt(v): an entry whose gradient is at rounding level can move by ~lr either way;
        # a wrong gradient (e.g. padding rows in the loss) moves most entries
        assert diff.max() <= 2 * 8 * 1e-3 and np.mean(diff > 1e-5) < 1e-3, (diff.max(), np.mean(diff > 1e-5))
    print("OK train")


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def _unlearn_once(spec: str, projection: str):
    """Four LoRA unlearning steps (dropout on; 5 flagged + 5 clean rows a step, which 4 devices do not divide) of
    a tiny BERT on mesh ``spec``."""
    from jdup import data, models, unlearn

    mesh = jmesh.make_mesh(spec)
    tok = models.load_tokenizer("builtin:minilm")
    forget, retain = (data.encode(tok, _data(n_rows, seed), max_length=32, buckets=(16, 32))
                      for n_rows, seed in ((10, 5), (14, 6)))  # fmt: skip
    settings = unlearn.UnlearnSettings(
        epochs=2, batch_size=5, lr=1e-3, warmup_frac=0.0, lora_rank=4, lora_alpha=8.0, early_stop="none",
        projection=projection, projection_options={"k": 4, "basis_batch_size": 4, "refresh": 2},
        ckpt_every_steps=0, progress=False,
    )  # fmt: skip
    model = jmesh.put_model(models.tiny_model("bert", 2, seed=0), mesh)
    res = unlearn.unlearn(model, forget, retain, settings, target_label=1, mesh=mesh)
    losses = [r["loss"] for r in res.log]
    return losses, jmesh.gather(nnx_params(res.merged)), res


def _check_unlearn(n: int) -> None:
    """No projection on ``auto``, the gradient projection (UPGP) on ``2x2`` / ``2x4``."""
    import jax

    cases = [("auto", "none"), ("2x2", "gradient")] if n == 4 else [("2x4", "gradient")]
    for spec, projection in cases:
        ref_losses, ref_params, _ = _unlearn_once("1", projection)
        assert len(ref_losses) == 4
        losses, params, res = _unlearn_once(spec, projection)
        assert res.log[-1]["step"] == 4
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
        a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in (params, ref_params))
        diff = np.abs(a - b)
        assert diff.max() <= 2 * 4 * 1e-3 and np.mean(diff > 1e-5) < 1e-3, (diff.max(), np.mean(diff > 1e-5))
    print("OK unlearn")


def _encoded(data, models):
    tok = models.load_tokenizer("builtin:minilm")
    return data.encode(tok, _data(7), max_length=32, buckets=(8, 16, 32))


def _main_process(pid: int, port: str, out: str, mode: str) -> None:
    """One of the two processes of :func:`_two_processes`."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    if mode == "train":
        losses, params, _ = _train_once("auto")
        unlearn_losses, _, _ = _unlearn_once("auto", "none")
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
        np.savez(os.path.join(out, f"train_{pid}.npz"), losses=losses, unlearn_losses=unlearn_losses, params=flat)
        jax.distributed.shutdown()
        return
    from jdup import data, features, models, predict

    mesh = jmesh.make_mesh("2x2")
    assert jax.process_count() == 2 and jmesh.mesh_record(mesh) == {"data": 2, "model": 2}
    model = jmesh.put_model(models.tiny_model("bert", 2, seed=0), mesh)
    enc = _encoded(data, models)
    np.save(os.path.join(out, f"logits_{pid}.npy"), predict.predict(model, enc, 3, mesh=mesh))
    got = features.extract_features(model, enc, 3, progress=False, mesh=mesh)
    np.save(os.path.join(out, f"features_{pid}.npy"), got["features"])
    jax.distributed.shutdown()


def _main(n: int, checks: str) -> None:
    import jax

    assert jax.device_count() == n, jax.devices()
    for name in checks.split(","):
        globals()[f"_check_{name}"](n)


if __name__ == "__main__":
    if sys.argv[1] == "mp":
        _main_process(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        _main(int(sys.argv[1]), sys.argv[2])
