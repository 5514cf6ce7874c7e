"""The unlearning step computes the last encoder layer at [CLS] only (``LossSettings.trim_last_layer``): its dropout
masks are the [CLS] rows of the full layer's masks, so loss, gradients and a short run equal the full-sequence
computation up to float rounding."""

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdup import dropout as DR
from jdup import unlearn as U
from jdup.models import tiny_model
from jdup.predict import predict
from jdup.stages import unlearn as S

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    lora_rank=4,
    lora_alpha=8.0,
    batch_size=4,
    epochs=2,
    eval_batch_size=8,
    progress=False,
    ckpt_every_steps=0,
    early_stop="none",
)


from tests.test_unlearn import _encoded  # noqa: E402  (the same tiny token batches as the unlearning tests)


@pytest.mark.parametrize("rng_impl", ["hash", "threefry"])
def test_leading_block_of_a_mask_is_the_full_masks_block(monkeypatch, rng_impl):
    monkeypatch.setenv("JDUP_DROPOUT_RNG", rng_impl)
    key = jax.random.key(5)
    full = np.asarray(DR.keep_mask(key, 0.9, (3, 4, 10, 6)))
    part = np.asarray(DR.keep_mask(key, 0.9, (3, 4, 1, 6), full_shape=(3, 4, 10, 6)))
    np.testing.assert_array_equal(part, full[:, :, :1])
    with DR.leading_rows(10):  # the trace-time context: same masks; a full-size tensor is unaffected
        np.testing.assert_array_equal(np.asarray(DR.keep_mask(key, 0.9, (3, 4, 2, 6))), full[:, :, :2])
        np.testing.assert_array_equal(np.asarray(DR.keep_mask(key, 0.9, (3, 4, 10, 6))), full)
    assert np.asarray(DR.keep_mask(key, 0.9, (3, 4, 1, 6))).tolist() != full[:, :, :1].tolist()  # no context
    with pytest.raises(ValueError):
        DR.keep_mask(key, 0.9, (3, 4), full_shape=(2, 4))


@pytest.fixture(scope="module")
def setup():
    victim = tiny_model("bert", 2, seed=4)
    cfg = S.UnlearnConfig(**TINY)
    st = U.build_student(victim, cfg)
    forget, retain = _encoded(8, 1, trigger=7), _encoded(8, 2)
    teacher = predict(victim, forget, 8)
    batch = U.joint_batch(U.forget_batch_at(forget, 4, 0, 0), teacher, U.clean_batch_at(retain, 4, 0, 0))
    return victim, cfg, st, forget, retain, teacher, batch


def test_trimmed_logits_loss_and_grads_equal_the_full_layer(setup, monkeypatch):
    _, cfg, st, _, _, _, batch = setup
    trim = U.LossSettings.from_config(cfg, 1)
    full = trim._replace(trim_last_layer=False)
    assert trim.trim_last_layer
    # the LoRA B matrices start at zero: move them so the adapters (and their dropout) change the numbers
    tr = jax.tree.map(
        lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), st.trainable
    )
    key = jax.random.key(3)
    logits = jax.jit(U.student_logits, static_argnums=(0, 5))
    lt = logits(st.graphdef, tr, st.frozen, batch, key, trim)
    lf = logits(st.graphdef, tr, st.frozen, batch, key, full)
    np.testing.assert_allclose(np.asarray(lt), np.asarray(lf), rtol=1e-5, atol=1e-6)
    # another key gives other logits (dropout is on, so the comparison above is not vacuous) ...
    other = logits(st.graphdef, tr, st.frozen, batch, jax.random.key(4), full)
    assert np.abs(np.asarray(other) - np.asarray(lf)).max() > 1e-3
    # ... and masks drawn at the [CLS] row's own shape would change them
    monkeypatch.setattr(DR, "leading_rows", lambda rows: contextlib.nullcontext())
    own = jax.jit(lambda *a: U.student_logits(*a, trim), static_argnums=0)(
        st.graphdef, tr, st.frozen, batch, key
    )
    assert np.abs(np.asarray(own) - np.asarray(lf)).max() > 1e-4  # 100x the tolerance above
    monkeypatch.undo()

    @functools.partial(jax.jit, static_argnums=1)
    def loss_grads(tr_, settings):
        def loss(t):
            f, r = U.loss_pieces(st.graphdef, t, st.frozen, batch, key, settings)
            return U.objective(f, r, 1.0, 1.0)

        return jax.value_and_grad(loss)(tr_)

    vt, gt = loss_grads(tr, trim)
    vf, gf = loss_grads(tr, full)
    np.testing.assert_allclose(float(vt), float(vf), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), gt, gf
    )
    # every differentiated leaf got a gradient (the last layer's query adapter included)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gt))


@pytest.mark.slow
def test_a_short_run_equals_the_full_layer_run(setup, monkeypatch):
    victim, cfg, _, forget, retain, teacher, _ = setup
    from jdup.unlearn import loop

    def run(trim: bool):
        class Settings(U.LossSettings):
            @classmethod
            def from_config(cls, c, target):
                return U.LossSettings.from_config(c, target)._replace(trim_last_layer=trim)

        monkeypatch.setattr(loop, "LossSettings", Settings)
        res = U.unlearn(victim, forget, retain, cfg, teacher_logits=teacher, target_label=1)
        return res

    a, b = run(True), run(False)
    assert len(a.log) == len(b.log) == a.total_steps > 2
    for ra, rb in zip(a.log, b.log, strict=True):
        for k in ("loss", "forget", "retain", "grad_norm"):
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-4, atol=1e-6, err_msg=k)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
        nnx.state(a.merged),
        nnx.state(b.merged),
    )


STEP_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jdup import runtime
    runtime.setup(cache_dir=sys.argv[2])
    from jdup import models, unlearn as U
    from jdup.stages import unlearn as S
    sys.path.insert(0, sys.argv[3])
    from tests.test_unlearn_speed import TINY, _encoded
    model = models.from_pretrained(sys.argv[1])
    forget, retain = _encoded(8, 1, trigger=7), _encoded(8, 2)
    cfg = S.UnlearnConfig(**TINY)
    teacher = np.zeros((8, 2), np.float32)
    before = runtime.compile_totals()
    res = U.unlearn(model, forget, retain, cfg, teacher_logits=teacher, target_label=1)
    print(json.dumps({"log": res.log, "compile": runtime.compile_since(before)}))
    """
)


def _step_child(model, cache, src) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "JDUP_COMPILATION_CACHE", "JDUP_KEEP"))
    }
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(src))
    proc = subprocess.run(
        [sys.executable, "-c", STEP_CHILD, str(model), str(cache), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=src,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_unlearning_step(tiny_model_dir, tmp_path):
    """The step's executables are kept across processes (jdup.aot): a second process runs the same binary (the
    same per-step numbers, bit for bit) without tracing and lowering the step again."""
    src = (
        tmp_path / "src"
    )  # a copy: the file names hash jdup's source, which concurrent edits must not change
    shutil.copytree(REPO / "jdup", src / "jdup", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "xla"
    first = _step_child(tiny_model_dir, cache, src)
    steps = [p for p in (cache / "aot").glob("*.exe")]
    assert steps  # the step of each padded length (and no forward: the teacher logits were given)
    second = _step_child(tiny_model_dir, cache, src)
    assert first["log"] == second["log"] and len(first["log"]) > 2
    assert second["compile"]["programs"] <= first["compile"]["programs"] - len(steps)
    assert second["compile"]["trace_s"] < first["compile"]["trace_s"]
