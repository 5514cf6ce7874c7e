"""DUP unlearning: optimiser/schedule parity with torch, the train step, resume, and run_unlearn end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdup import data as D
from jdup import lora, optim
from jdup import unlearn as U
from jdup.checkpoint import Checkpoint
from jdup.errors import JdupError
from jdup.models import tiny_model
from jdup.predict import predict
from jdup.stages import unlearn as S

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


def _encoded(n, seed, vocab=60, seq=12, num_labels=2, trigger=None):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, seq + 1, n).astype(np.int32)
    ids = np.zeros((n, seq), np.int32)
    mask = np.zeros((n, seq), np.int32)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(5, vocab, k)
        ids[i, 0] = 2
        mask[i, :k] = 1
        if trigger is not None:
            ids[i, 1] = trigger
    labels = rng.integers(0, num_labels, n).astype(np.int32)
    return D.Encoded(ids, mask, np.zeros_like(ids), lengths, labels, np.zeros(n, np.int8), (8, seq), 0)


@pytest.fixture(scope="module")
def victim():
    return tiny_model("bert", 2, seed=4)


# ---------------------------------------------------------------------------------------------- optimiser


def test_schedule_is_hf_linear_with_warmup():
    torch = pytest.importorskip("torch")
    from transformers import get_linear_schedule_with_warmup

    from jdup.optim import linear_warmup_decay, warmup_steps

    total, lr = 23, 5e-4
    warm = warmup_steps(total, 0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sch = get_linear_schedule_with_warmup(opt, warm, total)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    ours = [float(linear_warmup_decay(lr, total, warm)(t)) for t in range(total)]
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
    assert ours[0] == 0.0


def test_optimizer_matches_torch_adamw_with_clip():
    torch = pytest.importorskip("torch")
    from transformers import get_linear_schedule_with_warmup

    rng = np.random.default_rng(0)
    shapes = [(5, 3), (3,), (2, 4)]
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) * 3 for s in shapes] for _ in range(12)]
    total, lr = 12, 5e-2
    tp = [torch.nn.Parameter(torch.tensor(x)) for x in params]
    opt = torch.optim.AdamW(tp, lr=lr, weight_decay=0.01)
    sch = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    spec = U.OptimizerSpec(total, int(0.1 * total), weight_decay=0.01, clip=1.0)
    tx = spec.build(U.step_hparams(lr))
    jp = [jnp.asarray(x) for x in params]
    state = tx.init(jp)
    for g in grads:
        for t, gi in zip(tp, g, strict=True):
            t.grad = torch.tensor(gi)
        torch.nn.utils.clip_grad_norm_(tp, 1.0)
        opt.step()
        sch.step()
        upd, state = tx.update([jnp.asarray(x) for x in g], state, jp)
        jp = optax.apply_updates(jp, upd)
    for a, b in zip(jp, tp, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=2e-5, atol=2e-6)


def test_projection_slot_sits_after_adam_and_disables_decay():
    seen = {}

    def update(u, s, params=None):
        seen["u"] = u
        return jax.tree.map(lambda x: 0.5 * x, u), s

    proj = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    spec = U.OptimizerSpec(10, 0, weight_decay=0.5, clip=0.0, projection=proj)
    tx = spec.build(U.step_hparams(1.0, lambda_acc=0.0))  # the retain stream's learning rate 0: forget update only
    p = {"w": jnp.ones(3) * 2.0}
    g = {"w": jnp.array([1e-3, 1.0, 100.0])}
    upd, _ = tx.update((g, g), tx.init(p), p)
    # after Adam, the first step's direction is ~sign(g) whatever the scale; no decay term added
    np.testing.assert_allclose(np.asarray(seen["u"]["w"]), np.ones(3), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.5 * np.ones(3), rtol=1e-4)


# ---------------------------------------------------------------------------------------------- train step


@pytest.mark.slow
def test_step_changes_only_adapters_and_head(victim):
    cfg = S.UnlearnConfig(**TINY)
    st = U.build_student(victim, cfg)
    settings = U.LossSettings.from_config(cfg, 1)
    spec = U.OptimizerSpec(10, 0)
    hp = U.step_hparams(1e-2)
    forget, retain = _encoded(8, 1, trigger=7), _encoded(8, 2)
    teacher = predict(victim, forget, 8)
    before_frozen = jax.tree.map(np.asarray, st.frozen)
    before_trainable = [np.asarray(v[...]) for _, v in nnx.to_flat_state(st.trainable)]
    tr, opt_state = st.trainable, spec.init(st.trainable)
    for i in range(2):
        fb = U.forget_batch_at(forget, 4, i, 0)
        cb = U.clean_batch_at(retain, 4, i, 0)
        batch = U.joint_batch(fb, teacher, cb)
        tr, opt_state, m = U.jit_train_step(
            st.graphdef, spec, settings, tr, st.frozen, opt_state, batch, jax.random.key(i), hp
        )
        assert np.isfinite(float(m["loss"]))
    nnx.update(st.model, tr)
    # every frozen leaf of the student is bit-identical; every trainable leaf moved
    after_frozen = nnx.split(st.model, lora.trainable_filter(st.model), ...)[2]
    jax.tree.map(np.testing.assert_array_equal, before_frozen, jax.tree.map(np.asarray, after_frozen))
    for old, (path, new) in zip(before_trainable, nnx.to_flat_state(tr), strict=True):
        assert not np.array_equal(old, np.asarray(new[...])), path
    # and the victim (teacher) is untouched: its logits are those used as teacher
    np.testing.assert_array_equal(predict(victim, forget, 8), teacher)


@pytest.mark.slow
def test_traced_step_matches_the_fixed_optimizer_and_vmaps_over_cells(victim):
    """The step the sweep vmaps: lr and loss weights traced (StepHParams) give the numbers of a Python-float
    optimizer, and jax.vmap over K cells gives each cell's single-run step."""
    import functools

    cfg = S.UnlearnConfig(**{**TINY, "lambda_asr": 0.3, "lambda_acc": 0.7})
    st = U.build_student(victim, cfg)
    settings = U.LossSettings.from_config(cfg, 1)
    forget, retain = _encoded(8, 1, trigger=7), _encoded(8, 2)
    teacher = predict(victim, forget, 8)
    batch = U.joint_batch(U.forget_batch_at(forget, 4, 0, 0), teacher, U.clean_batch_at(retain, 4, 0, 0))
    spec = U.OptimizerSpec.from_config(cfg, 10)
    fixed = optim.adamw_chain(
        optim.linear_warmup_decay(3e-3, 10, optim.warmup_steps(10, cfg.warmup_frac)),
        weight_decay=cfg.weight_decay,
        clip=cfg.clip_norm,
    )
    hp = U.step_hparams(3e-3, 0.3, 0.7)

    @jax.jit
    def old(tr, opt_state, key):  # the same step with the learning rate a Python float in the optimizer
        def weighted(t):
            forget, retain = U.loss_pieces(st.graphdef, t, st.frozen, batch, key, settings)
            return U.objective(forget, retain, hp.lambda_asr, hp.lambda_acc)

        loss, grads = jax.value_and_grad(weighted)(tr)
        updates, opt_state = fixed.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, {"loss": loss}

    tr_a, os_a = st.trainable, fixed.init(st.trainable)
    tr_b, os_b = st.trainable, spec.init(st.trainable)
    for t in range(3):
        tr_a, os_a, m_a = old(tr_a, os_a, U.step_key(cfg.seed, t))
        tr_b, os_b, m_b = U.jit_train_step(
            st.graphdef, spec, settings, tr_b, st.frozen, os_b, batch, U.step_key(cfg.seed, t), hp
        )
        # equal up to float32 rounding of two differently fused programs: after the first step the parameters
        # already differ in the last bits on some CPUs, so the losses of later steps may too (a wrong learning rate
        # or loss weight moves the loss by ~1e-3)
        np.testing.assert_allclose(float(m_a["loss"]), float(m_b["loss"]), rtol=1e-5, atol=0)
    # the parameters to the tolerance of the vmapped cells below (a wrong learning rate moves them by ~1e-3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), tr_a, tr_b)

    # two cells (lr, lambdas, seeds differ) in one vmapped step == each cell's own step
    hps = U.step_hparams(np.array([3e-3, 1e-2]), np.array([0.3, 1.0]), np.array([0.7, 2.0]))
    seeds = np.array([cfg.seed, 7])
    stack = functools.partial(jax.tree.map, lambda *xs: jnp.stack(xs))
    tr_k, os_k = stack(st.trainable, st.trainable), stack(spec.init(st.trainable), spec.init(st.trainable))
    one = functools.partial(U.train_step, st.graphdef, spec, settings)
    step_k = jax.jit(jax.vmap(one, in_axes=(0, None, 0, None, 0, 0)))
    keys = jax.vmap(U.step_key, in_axes=(0, None))(seeds, 0)
    tr_k, _, _ = step_k(tr_k, st.frozen, os_k, batch, keys, hps)
    for i in range(2):
        hp_i = U.StepHParams(*(x[i] for x in hps))
        tr_i, _, _ = U.jit_train_step(
            st.graphdef,
            spec,
            settings,
            st.trainable,
            st.frozen,
            spec.init(st.trainable),
            batch,
            U.step_key(int(seeds[i]), 0),
            hp_i,
        )
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(
                np.asarray(a)[i], np.asarray(b), rtol=1e-5, atol=1e-7
            ),
            tr_k,
            tr_i,
        )


@pytest.mark.slow
def test_loss_pieces_are_consistent_with_losses(victim):
    cfg = S.UnlearnConfig(**{**TINY, "forget_loss": "kl"})  # the official −KL term is checked here
    st = U.build_student(victim, cfg)
    settings = U.LossSettings.from_config(cfg, 1)
    forget, retain = _encoded(5, 3), _encoded(6, 4)
    teacher = predict(victim, forget, 8) + 0.5
    b = U.joint_batch(next(D.batches(forget, 4, start=1)), teacher, next(D.batches(retain, 4)))
    f, r = U.loss_pieces(st.graphdef, st.trainable, st.frozen, b, None, settings)
    # forget batch 2 has 1 valid row (row 4); clean batch rows 0..3
    s_forget = predict(victim, forget.subset([4]), 8)
    from jdup import losses

    np.testing.assert_allclose(
        float(f), -float(losses.kl_batchmean(teacher[4:5], s_forget)), rtol=1e-4, atol=1e-6
    )
    s_clean = predict(victim, retain.subset([0, 1, 2, 3]), 8)
    np.testing.assert_allclose(float(r), float(losses.cross_entropy(s_clean, retain.labels[:4])), rtol=1e-4)


@pytest.mark.slow
def test_fused_and_two_forward_batches_agree(victim):
    cfg = S.UnlearnConfig(**TINY)
    st = U.build_student(victim, cfg)
    settings = U.LossSettings.from_config(cfg, 1)
    forget, retain = _encoded(6, 9), _encoded(6, 10)
    forget.lengths[:] = np.minimum(forget.lengths, 8)  # flagged batch in bucket 8, clean batch in bucket 12
    forget.attention_mask[:, 8:] = 0
    teacher = predict(victim, forget, 8)
    fb, cb = next(D.batches(forget, 4)), next(D.batches(retain, 4))
    assert fb["input_ids"].shape[1] != cb["input_ids"].shape[1]
    a = U.loss_pieces(st.graphdef, st.trainable, st.frozen, U.joint_batch(fb, teacher, cb), None, settings)
    b = U.loss_pieces(
        st.graphdef, st.trainable, st.frozen, U.joint_batch(fb, teacher, cb, False), None, settings
    )
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_plan_without_grouping_is_the_plain_order():
    forget, retain = _encoded(10, 11), _encoded(7, 12)
    plan = U.BatchPlan(forget, retain, 4, 3)
    for step in range(9):
        _same_batch(plan.forget_batch(step), U.forget_batch_at(forget, 4, step, 3))
        _same_batch(plan.clean_batch(step), U.clean_batch_at(retain, 4, step, 3))


def test_batch_plan_length_grouped_covers_every_row_and_pads_less():
    forget, retain = _encoded(70, 13, seq=40), _encoded(90, 14, seq=40)
    forget = dataclasses.replace(forget, buckets=(16, 32, 40))
    retain = dataclasses.replace(retain, buckets=(16, 32, 40))
    bs, per_epoch = 8, 9
    plan = U.BatchPlan(forget, retain, bs, 5, length_group=4, pad_multiple=8)
    plain = U.BatchPlan(forget, retain, bs, 5)
    tokens = {"grouped": 0, "plain": 0}
    clean_seen = []
    for e in range(3):
        rows = []
        for i in range(per_epoch):
            step = e * per_epoch + i
            fb, cb = plan.forget_batch(step), plan.clean_batch(step)
            rows += list(fb["index"][fb["valid"]])
            clean_seen += list(cb["index"][cb["valid"]])
            s = fb["input_ids"].shape[1]
            assert s % 8 == 0 and s >= forget.lengths[fb["index"][fb["valid"]]].max()
            assert cb["input_ids"].shape[1] % 8 == 0
            # batch format as jdup.data.batches: padding rows are copies of the first row, index -1
            assert np.all(fb["index"][~fb["valid"]] == -1)
            np.testing.assert_array_equal(
                fb["input_ids"][~fb["valid"]], fb["input_ids"][:1].repeat((~fb["valid"]).sum(), 0)
            )
            for name, p in (("grouped", plan), ("plain", plain)):
                j = U.joint_batch(p.forget_batch(step), np.zeros((70, 2)), p.clean_batch(step))
                tokens[name] += j["input_ids"].size
        assert sorted(rows) == list(range(70))  # every flagged row once per epoch
    # the clean stream is still cycled: 27 steps of 8 rows over 90 rows = every row 2 or 3 times
    counts = np.bincount(clean_seen, minlength=90)
    assert counts.min() >= 2 and counts.max() <= 3
    assert tokens["grouped"] < 0.9 * tokens["plain"]
    # a fresh plan (a resumed run) replays the same batches
    again = U.BatchPlan(forget, retain, bs, 5, length_group=4, pad_multiple=8)
    for step in (20, 3, 11):
        _same_batch(again.clean_batch(step), plan.clean_batch(step))
        _same_batch(again.forget_batch(step), plan.forget_batch(step))


@pytest.mark.slow
def test_unlearn_resumes_after_a_kill(victim, tmp_path):
    cfg = S.UnlearnConfig(**{**TINY, "ckpt_every_steps": 2, "epochs": 3})
    forget, retain = _encoded(10, 5, trigger=9), _encoded(12, 6)
    ref = U.unlearn(victim, forget, retain, cfg)

    class Kill(Exception):
        pass

    def killer(info):
        if info.step == 5:
            raise Kill

    ck = str(tmp_path / "ckpt")
    with pytest.raises(Kill):
        U.unlearn(victim, forget, retain, cfg, on_step=killer, checkpoint=Checkpoint(ck))
    resumed = U.unlearn(victim, forget, retain, cfg, checkpoint=Checkpoint(ck))
    assert resumed.steps == ref.steps == 9
    assert [r["step"] for r in resumed.log] == list(range(1, 10))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        ref.student.trainable,
        resumed.student.trainable,
    )


def test_checkpoint_fingerprint_comes_from_the_algorithm_settings_only():
    """Files (out, model, data) and settings that do not change the numbers leave the fingerprint alone; an
    algorithm setting, the set sizes or the target change it."""
    from jdup.unlearn.loop import settings_fingerprint

    forget, retain = _encoded(4, 1), _encoded(6, 2)

    def fp(cfg, target=1, n_forget=4):
        cell = U.Cell(cfg, forget.subset(np.arange(n_forget)), retain, np.zeros((n_forget, 2)), target, None)
        return settings_fingerprint(cell)

    base = fp(S.UnlearnConfig(**TINY, out="a", model="m1", data="d1"))
    assert fp(S.UnlearnConfig(**TINY, out="b", model="m1", data="d1")) == base
    assert fp(S.UnlearnConfig(**{**TINY, "progress": True, "eval_batch_size": 64}, out="b")) == base
    assert fp(U.UnlearnSettings(**TINY)) == base
    assert fp(U.UnlearnSettings(**{**TINY, "lr": 1e-3})) != base
    assert fp(U.UnlearnSettings(**TINY), target=0) != base and fp(U.UnlearnSettings(**TINY), n_forget=3) != base


def test_a_cell_holds_the_algorithm_settings_without_paths(victim):
    """A stage config given to the loop is reduced to its UnlearnSettings (no model, data or out reach it)."""
    cfg = S.UnlearnConfig(**TINY, out="o", model="m", data="d")
    cell = U.make_cell(victim, _encoded(4, 1), _encoded(6, 2), cfg, teacher_logits=np.zeros((4, 2)), target_label=1)
    assert type(cell.settings) is U.UnlearnSettings and cell.settings == cfg.settings()


@pytest.mark.slow
def test_monitor_keeps_best_state_and_stops(victim):
    cfg = S.UnlearnConfig(**{**TINY, "epochs": 4, "eval_every_steps": 1})
    forget, retain = _encoded(8, 7), _encoded(8, 8)
    scores = iter([0.9, 0.5, 0.2, 0.7, 0.05, 0.6, 0.6, 0.6, 0.6])

    def monitor(logits_fn):
        s = next(scores)
        return U.Evaluation(score=s, ok=s != 0.2, stop=s < 0.1)

    res = U.unlearn(victim, forget, retain, cfg, monitor=monitor)
    assert res.stopped_early and res.steps == 4 and res.best_step == 4
    assert [h["step"] for h in res.history] == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- run_unlearn


@pytest.mark.slow
def test_run_unlearn_writes_model_and_metrics(tiny_model_dir, synthetic_dup, tmp_path):
    from jdup import models

    out = tmp_path / "purify"
    cfg = S.UnlearnConfig(
        model=str(tiny_model_dir),
        data=str(synthetic_dup),
        out=str(out),
        max_length=32,
        **{**TINY, "early_stop": "proxy", "ckpt_every_steps": 3},
        detect={"progress": False, "plots": False, "max_length": 32},
    )
    m = S.run_unlearn(cfg)
    for k in (
        "cacc_before",
        "asr_before",
        "cacc_after",
        "asr_after",
        "ra_before",
        "ra_after",
        "n_flagged",
        "seconds",
    ):
        assert k in m, k
    assert json.loads((out / "metrics.json").read_text())["n_flagged"] == m["n_flagged"]
    # JAX's compile work per phase adds up to the call's (docs/performance.md)
    ph = m["seconds_phases"]
    by_phase, c = ph["compile_phases"], ph["compile"]
    assert set(by_phase) == {"load", "detect", "prepare", "before", "unlearn", "after", "save"}
    assert min(by_phase.values()) >= 0.0 and by_phase["unlearn"] > 0.0
    assert abs(sum(by_phase.values()) - (c["trace_s"] + c["lower_s"] + c["compile_s"])) < 1e-3
    flags = np.load(out / "detection" / "flags.npy")
    assert flags.sum() == m["n_flagged"] > 0
    assert not (out / "ckpt").exists()
    # RA is defined here: test-poison rows line up with the non-target test-clean rows
    assert m["ra_before"] is not None and 0.0 <= m["ra_after"] <= 1.0
    # the exported model reproduces the reported CACC
    purified = models.from_pretrained(out / "model")
    tok = models.load_tokenizer(out / "model")
    tc = D.encode(tok, D.read_split(synthetic_dup, "test-clean"), 32)
    pred_c = predict(purified, tc, 8).argmax(-1)
    acc = float((pred_c == tc.labels).mean())
    assert abs(acc - m["cacc_after"]) < 1e-9
    # ... and the trigger ASR: pairs whose clean copy stays off the target, triggered copy sent there
    tp = D.encode(tok, D.read_split(synthetic_dup, "test-poison"), 32)
    pred_p, t = predict(purified, tp, 8).argmax(-1), m["target"]
    keep = pred_c[tc.labels != t] != t
    assert m["asr_trigger_after"] == pytest.approx(float((pred_p[keep] == t).mean()), abs=1e-12)
    assert m["asr_trigger_before"] is not None
    # a given detection folder is reused as is
    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "again"), detection=str(out / "detection"), epochs=0)
    m2 = S.run_unlearn(cfg2)
    assert m2["n_flagged"] == m["n_flagged"] and m2["cacc_after"] == m2["cacc_before"]
    with pytest.raises(JdupError):
        S.run_unlearn(dataclasses.replace(cfg2, forget_loss="nope"))
    # a defender's folder without test-poison: CACC only, the defender's target still drives the forget loss
    import shutil

    bare = tmp_path / "no-test-poison"
    shutil.copytree(synthetic_dup, bare)
    (bare / "test-poison.csv").unlink()
    m3 = S.run_unlearn(dataclasses.replace(cfg2, data=str(bare), out=str(tmp_path / "bare"), detection=None,
                                          epochs=1))
    assert m3["asr_before"] is None and m3["asr_after"] is None and m3["ra_after"] is None
    assert m3["asr_trigger_after"] is None
    assert m3["target"] == m["target"]  # the evaluation target from poison_config.json
    # the defender's target comes from the victim's predictions on the same flags, not from test-poison
    assert m3["n_flagged"] == m["n_flagged"] and m3["defender_target"] == m["defender_target"]
    assert m3["cacc_before"] == m["cacc_before"] and m3["steps"] > 0
    (bare / "poison_config.json").unlink(missing_ok=True)
    with pytest.raises(JdupError, match="test-poison"):  # the oracle rule needs the attack's target
        S.run_unlearn(dataclasses.replace(cfg2, data=str(bare), out=str(tmp_path / "bare2"), detection=None,
                                          early_stop="oracle_dev_poison"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_unlearning_a_rematerialised_model_equals_the_plain_one(arch):
    """``remat=True`` (each layer recomputed in the backward pass, for memory) trains the LoRA student to the same
    adapters, dropout on: the remat wrapper carries the dropout stream and works on the step's traced parameters
    (``nnx.remat`` failed there: "Cannot mutate Param from a different trace level")."""
    cfg = S.UnlearnConfig(**{**TINY, "epochs": 1})
    forget, retain = _encoded(8, 5, trigger=9), _encoded(8, 6)
    plain = U.unlearn(tiny_model(arch, 2, seed=4), forget, retain, cfg)
    remat = U.unlearn(tiny_model(arch, 2, seed=4, remat=True), forget, retain, cfg)
    assert remat.steps == plain.steps == 2
    np.testing.assert_allclose([r["loss"] for r in remat.log], [r["loss"] for r in plain.log], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        plain.student.trainable,
        remat.student.trainable,
    )
