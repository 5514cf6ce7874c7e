"""UPGP: sensitivity detection pieces (jdup.sensitivity), rank fusion (jdup.fusion) and the projection builder/hook
(jdup.projection) inside jdup.unlearn. The decision rules and the MiniLM badnets check are in test_detect_upgp.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdup import config as config_lib
from jdup import data as D
from jdup import fusion, metrics, optim, projection, sensitivity, subspace
from jdup import predict as predict_lib
from jdup.errors import JdupError
from jdup.settings import ProjectionOptions, UPGPConfig

# ------------------------------------------------------------------------------------------------ pure helpers


def test_ensemble_standardises_scales_and_flipped_labels():
    a = np.array([0.0, 1.0, 2.0, 3.0, 100.0])
    b = 1000.0 * a
    np.testing.assert_allclose(fusion.ensemble_scores([a, b]), fusion.ensemble_scores([a]))
    calib = np.array([True, True, True, True, False])
    e = fusion.ensemble_scores([a, -a], calib=calib)
    np.testing.assert_allclose(e, 0.0, atol=1e-9)
    np.testing.assert_allclose(fusion.ensemble_scores([a, b], standardize=False), 500.5 * a)
    np.testing.assert_allclose(fusion.ensemble_scores([a, -a], rank=True), 0.4)
    y = np.array([0, 1, 2, 0, 1])
    f = sensitivity.flipped_labels(y, 3, seed=0)
    assert (f != y).all() and f.max() < 3
    np.testing.assert_array_equal(sensitivity.flipped_labels(np.array([0, 1]), 2, 0), [1, 0])


# ---------------------------------------------------------------------------------------------- tiny model set


def _encoded(n, seed, poison_frac=0.0, trigger=7, target=1, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, 140, size=(n, length)).astype(np.int32)
    labels = (ids[:, 1] >= 120).astype(np.int32)
    ids[:, 0] = 101
    lengths = rng.integers(6, length + 1, size=n).astype(np.int32)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    poison = np.zeros(n, np.int8)
    k = int(poison_frac * n)
    ids[:k, 2] = trigger
    labels[:k] = target
    poison[:k] = 1
    return D.Encoded(ids, mask, np.zeros_like(ids), lengths, labels, poison, (length,), 0)  # one shape


@pytest.fixture(scope="module")
def tiny():
    from jdup import models

    return models.tiny_model("bert", 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _unlearn_cfg(**kw):
    from jdup.stages import unlearn as S

    base = dict(
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        epochs=1,
        batch_size=8,
        early_stop="none",
        progress=False,
        model_dropout=False,
        warmup_frac=0.0,
        weight_decay=0.0,
        lr=1e-2,
    )
    base.update(kw)
    return S.UnlearnConfig(**base)


def _projection(kind, options, model, cfg, retain, forget=None):
    """``projection.build_projection`` on a fresh student of ``model`` (options as a mapping, built as the
    ``projection_options`` section of a config is): ``(transform, hook, student)``."""
    from jdup import unlearn as U

    opts = config_lib.build(ProjectionOptions, dict(options), source="projection_options")
    student = U.build_student(model, cfg)
    tx, hook = projection.build_projection(kind, opts, student, retain=retain, forget=forget, seed=int(cfg.seed))
    return tx, hook, student


@pytest.mark.slow
def test_detection_pipeline_and_vmapped_first_order_matches_a_loop(tiny):
    normal, scored = _encoded(64, 0), _encoded(24, 1, poison_frac=0.25)
    cfg = UPGPConfig(
        max_steps=6,
        eval_every=3,
        n_perturbations=1,
        lora_rank=4,
        batch_size=16,
        first_order_batch=8,
    )
    det = sensitivity.detect_upgp(tiny, scored, normal, cfg)
    assert det.scores.shape == det.flags.shape == det.sensitivity.shape == (24,)
    assert det.first_order.shape == (24,) and np.all(np.abs(det.first_order) <= 1.0 + 1e-6)
    assert 0 <= det.auroc <= 1 and det.info["perturbations"][0]["steps"] >= 3
    assert det.auroc == pytest.approx(metrics.auroc(scored.poison.astype(bool), det.scores))  # of the scores it returns
    # the scored rows are labelled by the victim's predictions (scored_labels: predicted): flags lie in the target
    # class of those predictions
    preds = predict_lib.predict(tiny, scored, 64).argmax(-1)
    assert 1 <= det.flags.sum() <= 12 and (preds[det.flags] == det.target_class).all()

    # the vmapped per-sample gradient dots equal one jax.grad per row
    graphdef, tr0, frozen = sensitivity._fresh_adapter(tiny, 4, 8.0, ("query", "value"), jax.random.key(3))
    tr0 = jax.tree.map(lambda x: x + 0.01, tr0)  # B != 0 so both factors get gradient
    b = next(D.batches(scored, 4))
    batch = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    direction = jax.tree.map(lambda x: jnp.ones_like(x), tr0)
    dots, norms = sensitivity._per_sample_dots(graphdef, tr0, frozen, direction, batch)
    for i in range(4):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        row["mask"] = np.ones(1, np.float32)
        g = sensitivity.mean_grad(graphdef, tr0, frozen, row)
        ref = sum(float(jnp.sum(x)) for x in jax.tree.leaves(g))
        np.testing.assert_allclose(float(dots[i]), ref, rtol=1e-4, atol=1e-6)
        ref_n = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g))))
        np.testing.assert_allclose(float(norms[i]), ref_n, rtol=1e-4)


@pytest.mark.slow
def test_gradient_projection_step_changes_clean_loss_at_second_order(tiny):
    """Projected step: clean-loss change O(lr^2); unprojected: O(lr) (LoRA + head of a tiny BERT, float32)."""
    from jdup import unlearn as U

    cfg = _unlearn_cfg()
    clean, forget = _encoded(32, 5), _encoded(16, 6, poison_frac=1.0)
    st = U.build_student(tiny, cfg)
    g, fr = st.graphdef, st.frozen
    tr = jax.tree.map(lambda x: x + 0.05 * jnp.sign(x + 1e-3), st.trainable)  # move off B = 0
    probe = projection._fixed_batches(clean, len(clean), 1, 0)[0]
    stack = projection.clean_gradient_stack(g, tr, fr, clean, 1, len(clean), 0)
    bases, _ = subspace.gradient_basis(stack, 1.0, per_block=False, max_rank=1)
    fb = projection._fixed_batches(forget, len(forget), 1, 1)[0]
    fb["labels"] = 1 - fb["labels"]
    direction = sensitivity.mean_grad(g, tr, fr, fb)
    projected = optim.project(direction, bases, mode="global")
    assert float(optim.subspace_cosine(direction, bases, mode="global")) > 1e-2
    norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(direction))))
    base = float(projection._probe_loss(g, tr, fr, probe))

    def delta(d, lr):
        moved = jax.tree.map(lambda p, u: p - lr / norm * u, tr, d)
        return abs(float(projection._probe_loss(g, moved, fr, probe)) - base)

    raw = [delta(direction, lr) for lr in (0.02, 0.005)]
    assert 3.0 < raw[0] / raw[1] < 7.0  # O(lr): a 4x step gives a ~4x change
    proj = [
        delta(projected, lr) for lr in (2.0, 1.0)
    ]  # large steps: the change is tiny and clearly quadratic
    assert 3.2 < proj[0] / proj[1] < 5.0  # O(lr^2): a 2x step gives a ~4x change
    assert proj[1] < 1e-4 * delta(direction, 1.0)


@pytest.mark.slow
def test_retain_update_is_a_separate_unprojected_stream(tiny):
    """docs/upgp-method.md §5.6: with a projection, the forget update is projected, the retain (clean CE) update is not."""
    from jdup import unlearn as U

    cfg = _unlearn_cfg()
    clean, forget = _encoded(16, 13), _encoded(16, 14, poison_frac=1.0)
    st = U.build_student(tiny, cfg)
    g, tr, fr = st.graphdef, jax.tree.map(lambda x: x + 0.05, st.trainable), st.frozen
    settings = U.LossSettings.from_config(cfg, 1)
    teacher = np.asarray(predict_lib.predict(tiny, forget, 16))
    batch = U.joint_batch(next(D.batches(forget, 8)), teacher, next(D.batches(clean, 8)))

    def grad_of(i):  # jitted: one compilation instead of one per operation
        return jax.jit(jax.grad(lambda t: U.loss_pieces(g, t, fr, batch, None, settings)[i]))(tr)

    g_forget, g_retain = grad_of(0), grad_of(1)
    # protected subspace: the retain gradient's own direction plus the sign pattern Adam's first step takes
    stack = jax.tree.map(lambda a, b: jnp.stack([a, jnp.sign(b)]), g_retain, g_retain)
    bases, _ = subspace.gradient_basis(stack, 1.0, per_block=False, max_rank=2)
    proj = optim.project_null_space(2, 1.0, mode="global", bases=bases)
    spec = U.OptimizerSpec(10, 0, weight_decay=0.0, clip=1.0, projection=proj)
    hp = U.step_hparams(0.1)
    tx = spec.build(hp)  # a transform over the pair (forget, retain) of gradients
    state = tx.init(tr)
    u_both, _ = jax.jit(tx.update)((g_forget, g_retain), state, tr)
    forget_tx = optim.adamw_chain(0.1, clip=1.0, projection=proj)
    retain_tx = optim.adamw_chain(0.1, clip=1.0)
    u_forget, _ = jax.jit(forget_tx.update)(g_forget, forget_tx.init(tr), tr)
    u_retain, _ = jax.jit(retain_tx.update)(g_retain, retain_tx.init(tr), tr)

    def cos(u):
        return float(optim.subspace_cosine(u, bases, mode="global"))

    assert cos(g_forget) > 1e-2  # the forgetting gradient does reach into the clean subspace ...
    assert cos(u_forget) <= 1e-5  # ... and its update is projected out of it
    assert cos(u_retain) > 0.5  # the retain update keeps its component in the clean subspace
    for a, b, c in zip(
        jax.tree.leaves(u_both), jax.tree.leaves(u_forget), jax.tree.leaves(u_retain), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + np.asarray(c), rtol=1e-5, atol=1e-7)
    assert optim.get_basis(state) is not None  # the hook finds the projection state inside the pair

    # the jitted train step routes the two loss terms into the two streams (one forward, two backwards)
    new_tr, _, m = U.jit_train_step(g, spec, settings, tr, fr, spec.init(tr), batch, None, hp)
    moved = jax.tree.map(lambda a, b: a - b, new_tr, tr)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(u_both), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # jit vs eager float noise
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


@pytest.mark.slow
def test_projection_hook_in_unlearn_logs_sensitivity_and_refreshes(tiny):
    from jdup import unlearn as U

    cfg = _unlearn_cfg(epochs=2, warmup_frac=0.1)
    clean, forget = _encoded(48, 7), _encoded(16, 8, poison_frac=1.0)
    opts = {"k": 4, "refresh": 2, "basis_batch_size": 8, "probe_rows": 16}
    tx, hook, student = _projection("gradient", opts, tiny, cfg, clean, forget)
    res = U.unlearn(tiny, forget, clean, cfg, projection=tx, on_step=hook, student=student)
    rows = res.log
    assert len(rows) == 4 and hook.refreshes == 2
    assert all(r["sens_after"] <= 1e-5 for r in rows)
    assert max(r["sens_before"] for r in rows) > 1e-3
    assert all("clean_loss_change" in r for r in rows) and "basis_rank" in rows[1]
    with pytest.raises(JdupError):
        _projection("columns", {}, tiny, cfg, clean)
    with pytest.raises(JdupError, match="unknown key"):
        _projection("gradient", {"kk": 1}, tiny, cfg, clean)


@pytest.mark.slow
def test_inflora_keeps_down_projection_orthogonal_and_clean_preactivations(tiny):
    from jdup import unlearn as U

    cfg = _unlearn_cfg(epochs=2)
    clean, forget = _encoded(48, 9), _encoded(16, 10, poison_frac=1.0)
    tx, hook, student = _projection(
        "inflora", {"repr_eps": 0.9, "min_free": 8, "probe_rows": 16}, tiny, cfg, clean, forget
    )
    trainable = hook.prepare_student(student)
    assert hook.prepared
    # the optimizer of a projected run: tx on the forget stream, the variant's structural constraints on the retain
    spec = U.OptimizerSpec(10, 0, weight_decay=0.0, projection=tx, retain_projection=hook.retain_projection)
    settings = U.LossSettings.from_config(cfg, 1)
    teacher = np.zeros((len(forget), 2), np.float32)
    teacher[:, 1] = 5.0
    batch = U.joint_batch(next(D.batches(forget, 8)), teacher, next(D.batches(clean, 8)))
    new_tr, _, _ = U.jit_train_step(
        student.graphdef, spec, settings, trainable, student.frozen, spec.init(trainable), batch,
        jax.random.key(0), U.step_hparams(1e-2),
    )

    leaves_old = dict(zip(projection._leaf_paths(trainable), jax.tree.leaves(trainable), strict=True))
    leaves_new = dict(zip(projection._leaf_paths(new_tr), jax.tree.leaves(new_tr), strict=True))
    moved_b = 0.0
    for path, a in leaves_new.items():
        if path[-1] != "lora_a":
            continue
        module = "/".join(map(str, path[:-1]))
        u = np.asarray(hook.module_bases[module])
        np.testing.assert_array_equal(np.asarray(a), np.asarray(leaves_old[path]))  # A is frozen
        assert np.max(np.abs(u.T @ np.asarray(a))) <= 1e-5
        b_path = path[:-1] + ("lora_b",)
        db = np.asarray(leaves_new[b_path]) - np.asarray(leaves_old[b_path])
        moved_b = max(moved_b, float(np.abs(db).max()))
        # clean inputs in span(U): pre-activation change of the adapter x (A dB) stays below 1e-5 (relative)
        x = np.random.default_rng(0).normal(size=(20, u.shape[1])) @ u.T
        change = np.abs(x @ (np.asarray(a) @ db)).max()
        assert change <= 1e-5 * max(1.0, np.abs(x).max())
    assert moved_b > 0.0  # B did train


@pytest.mark.slow
def test_gradient_basis_protects_lora_a_once_b_leaves_zero(tiny):
    """Issue 14 item 3: at B = 0 the clean gradient of every LoRA A is exactly 0, so the initial gradient basis has
    rank 0 on A; the hook re-estimates it at the first step after which B != 0, before A has moved."""
    from jdup import unlearn as U

    cfg = _unlearn_cfg(
        epochs=2, warmup_frac=0.5
    )  # 4 steps, 2 warm-up steps: lr 0 at step 1, B != 0 after step 2
    clean, forget = _encoded(48, 7), _encoded(16, 8, poison_frac=1.0)

    def run(informative: bool):
        student = U.build_student(tiny, cfg)
        opts = projection.ProjectionOptions(
            k=4, refresh=0, basis_batch_size=8, probe_rows=16, informative_refresh=informative
        )
        tx, hook = projection.build_projection("gradient", opts, student, retain=clean, forget=forget, seed=0)
        a_leaves = [p for p in hook.leaf_ranks if p.endswith("lora_a")]
        assert len(a_leaves) == 6 and all(hook.leaf_ranks[p] == 0 for p in a_leaves)  # A unprotected at B = 0
        assert all(r > 0 for p, r in hook.leaf_ranks.items() if p.endswith("lora_b"))
        a0 = {
            p: np.asarray(x)
            for p, x in zip(
                projection._leaf_paths(student.trainable), jax.tree.leaves(student.trainable), strict=True
            )
            if p[-1] == "lora_a"
        }
        res = U.unlearn(tiny, forget, clean, cfg, projection=tx, on_step=hook, student=student)
        return hook, res, a0, a_leaves

    hook, res, a0, a_leaves = run(True)
    assert hook.informative_step == 2 and hook.refreshes == 0
    assert [s for s, _ in hook.rank_history] == [0, 2]
    assert all(hook.leaf_ranks[p] > 0 for p in a_leaves)  # estimated where A's gradient is informative
    rows = res.log
    assert [r["basis_rank_a_min"] for r in rows] == [0.0] + [rows[1]["basis_rank_a_min"]] * 3
    assert rows[1]["basis_rank_a_min"] > 0
    assert all(r["sens_after"] <= 1e-5 for r in rows)
    tr = res.student.trainable
    moved = [
        float(np.abs(np.asarray(x) - a0[p]).max())
        for p, x in zip(projection._leaf_paths(tr), jax.tree.leaves(tr), strict=True)
        if p[-1] == "lora_a"
    ]
    assert min(moved) > 0  # A did train (inside the complement of its clean-gradient basis)

    off, _, _, _ = run(False)  # the previous behaviour: A keeps a rank-0 basis for the whole run
    assert off.informative_step is None and all(off.leaf_ranks[p] == 0 for p in a_leaves)


@pytest.mark.slow
def test_representation_projection_keeps_down_projections_in_the_clean_complement(tiny):
    """Through jdup.unlearn (the in-place fallback moves A into the complement after step 1, lr 0 there)."""
    from jdup import unlearn as U

    cfg = _unlearn_cfg(epochs=2, warmup_frac=0.1)
    clean, forget = _encoded(48, 11), _encoded(16, 12, poison_frac=1.0)
    tx, hook, student = _projection(
        "representation", {"min_free": 8, "probe_rows": 16}, tiny, cfg, clean, forget
    )
    res = U.unlearn(tiny, forget, clean, cfg, projection=tx, on_step=hook, student=student)
    assert all(r["sens_after"] <= 1e-5 for r in res.log)
    tr = res.student.trainable
    checked = 0
    for path, a in zip(projection._leaf_paths(tr), jax.tree.leaves(tr), strict=True):
        if path[-1] == "lora_a":
            u = np.asarray(hook.module_bases["/".join(map(str, path[:-1]))])
            assert np.abs(u.T @ np.asarray(a)).max() <= 1e-5
            checked += 1
    assert checked == 6


def test_options_dataclass_is_documented():
    names = {f.name for f in dataclasses.fields(ProjectionOptions)}
    assert {"eps", "k", "refresh", "beta", "per_block"} <= names
