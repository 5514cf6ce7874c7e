"""Contract tests for jdup.optim (the projection transform, the two-stream transform, the warm-up rule) and the
basis estimators of jdup.subspace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdup import optim, subspace


def _orthonormal(key, n, k, width=None):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, k)))
    width = k if width is None else width
    return jnp.pad(q, ((0, 0), (0, width - k)))


def _tree(key, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "a": jax.random.normal(k1, (6, 4)).astype(dtype),
        "b": {
            "w": jax.random.normal(k2, (5, 3)).astype(dtype),
            "bias": jax.random.normal(k3, (3,)).astype(dtype),
        },
    }


def _block_bases(key, tree, k=3, width=4, rows=False):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = []
    for kk, x in zip(keys, leaves, strict=True):
        n = x.shape[0] if (rows and x.ndim >= 2) else x.size
        out.append(_orthonormal(kk, n, min(k, n), width))
    return jax.tree.unflatten(treedef, out)


def _ratio(updates, bases, mode):
    """max |U^T u| / |u| with |u| the norm of the whole update (block bases: max over blocks)."""
    if mode == "global":
        flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(updates)])
        return float(jnp.max(jnp.abs(bases.T @ flat)) / jnp.linalg.norm(flat))
    worst = 0.0
    u_leaves, treedef = jax.tree.flatten(updates)
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(u, jnp.float32))) for u in u_leaves)))
    for u, b in zip(u_leaves, treedef.flatten_up_to(bases), strict=True):
        if b is None:
            continue
        m = jnp.asarray(u, jnp.float32).reshape(b.shape[0], -1)
        worst = max(worst, float(jnp.max(jnp.abs(b.T @ m))) / norm)
    return worst


@pytest.mark.parametrize("mode", ["block", "rows", "global"])
@pytest.mark.slow
def test_projection_removes_basis_component_and_is_idempotent(mode):
    key = jax.random.key(0)
    u = _tree(key)
    if mode == "global":
        total = sum(x.size for x in jax.tree.leaves(u))
        bases = _orthonormal(jax.random.key(1), total, 5, 8)
    else:
        bases = _block_bases(jax.random.key(1), u, rows=mode == "rows")
    tx = optim.project_null_space(max_rank=8 if mode == "global" else 4, mode=mode)
    state = optim.set_basis(tx.init(u), bases)
    assert _ratio(u, bases, mode) > 0.1  # the raw update does have a component in span(U)
    p, state = jax.jit(tx.update)(u, state)
    assert _ratio(p, bases, mode) <= 1e-5
    pp, _ = jax.jit(tx.update)(p, state)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(pp), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The removed part is the orthogonal projection: p is orthogonal to u - p.
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(u), strict=True):
        assert a.shape == b.shape
    assert int(state.count) == 1
    assert float(state.cos_in) > 0.05 and float(state.cos_out) <= 1e-5  # logged "unlearning sensitivity"


def test_zero_bases_are_identity_and_beta_interpolates():
    u = _tree(jax.random.key(2))
    tx = optim.project_null_space(max_rank=4, beta=0.5)
    state = tx.init(u)
    out, _ = tx.update(u, state)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(u), strict=True):
        np.testing.assert_array_equal(a, b)
    bases = _block_bases(jax.random.key(3), u)
    state = optim.set_basis(state, bases)
    half, _ = tx.update(u, state)
    full, _ = tx.update(u, optim.set_basis(state, beta=1.0))
    for h, f, x in zip(jax.tree.leaves(half), jax.tree.leaves(full), jax.tree.leaves(u), strict=True):
        np.testing.assert_allclose(h, 0.5 * (x + f), atol=1e-6)


def test_mask_leaves_unprotected_leaves_untouched():
    u = _tree(jax.random.key(4))
    mask = {"a": True, "b": {"w": False, "bias": False}}
    tx = optim.project_null_space(max_rank=4, mode="rows", mask=mask)
    state = tx.init(u)
    assert state.bases["b"]["w"] is None and state.bases["a"].shape == (6, 4)
    state = optim.set_basis(
        state, {"a": _orthonormal(jax.random.key(5), 6, 4), "b": {"w": None, "bias": None}}
    )
    out, _ = jax.jit(tx.update)(u, state)
    np.testing.assert_array_equal(out["b"]["w"], u["b"]["w"])
    assert _ratio(out, state.bases, "rows") <= 1e-5


def _hetero_grads(key, steps, n):
    scales = jnp.logspace(-3, 1, n)  # very different coordinate scales: Adam rescales them unevenly
    return jax.random.normal(key, (steps, n)) * scales[None] + 0.3 * scales[None]


def test_projected_adam_keeps_orthogonality_but_projecting_before_adam_does_not():
    n, k, steps = 60, 6, 30
    basis = _orthonormal(jax.random.key(6), n, k, 8)
    grads = _hetero_grads(jax.random.key(7), steps, n)
    params = {"w": jnp.zeros(n)}

    after = optim.adamw_chain(1e-2, projection=optim.project_null_space(max_rank=8, mode="global"), clip=None)
    before = optax.chain(optim.project_null_space(max_rank=8, mode="global"), optax.adam(1e-2))
    worst = {}
    for name, tx in (("after", after), ("before", before)):
        state = optim.set_basis(tx.init(params), basis)
        upd = jax.jit(tx.update)
        w = 0.0
        for t in range(steps):
            u, state = upd({"w": grads[t]}, state, params)
            w = max(w, _ratio(u, basis, "global"))
        worst[name] = w
    assert worst["after"] <= 1e-5
    assert worst["before"] > 1e-2  # guards the chain order


def test_adamw_chain_with_projection_clip_and_decay_stays_orthogonal():
    n = 40
    basis = _orthonormal(jax.random.key(8), n, 4)
    tx = optim.adamw_chain(1e-3, projection=optim.project_null_space(max_rank=4), clip=1.0, weight_decay=0.1)
    params = {"w": jax.random.normal(jax.random.key(9), (n,))}
    state = optim.set_basis(tx.init(params), {"w": basis})
    for t in range(5):
        g = {"w": 10.0 * jax.random.normal(jax.random.key(10 + t), (n,))}
        u, state = tx.update(g, state, params)
        assert _ratio(u, {"w": basis}, "block") <= 1e-5


def test_basis_refresh_does_not_recompile():
    u = _tree(jax.random.key(11))
    traces = []

    tx = optim.adamw_chain(1e-3, projection=optim.project_null_space(max_rank=4))

    def step(g, state):
        traces.append(1)
        return tx.update(g, state, g)

    step = jax.jit(step)
    state = tx.init(u)
    _, state = step(u, state)
    for seed in (12, 13, 14):
        state = optim.set_basis(state, _block_bases(jax.random.key(seed), u, k=seed - 10))
        out, state = step(u, state)
        assert _ratio(out, optim.get_basis(state).bases, "block") <= 1e-5
    assert len(traces) == 1
    assert int(optim.get_basis(state).refreshes) == 3
    with pytest.raises(ValueError, match="max_rank"):
        optim.set_basis(state, _block_bases(jax.random.key(15), u, k=2, width=2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_is_preserved(dtype):
    u = _tree(jax.random.key(16), dtype)
    bases = _block_bases(jax.random.key(17), u)
    for tx in (
        optim.project_null_space(max_rank=4),
        optim.adamw_chain(1e-3, projection=optim.project_null_space(4)),
    ):
        state = optim.set_basis(tx.init(u), bases)
        out, _ = jax.jit(tx.update)(u, state, u)
        for a in jax.tree.leaves(out):
            assert a.dtype == dtype
    out, _ = optim.project_null_space(4).update(
        u, optim.set_basis(optim.project_null_space(4).init(u), bases)
    )
    assert _ratio(out, bases, "block") <= (
        1e-5 if dtype == jnp.float32 else 1e-2
    )  # bf16 rounding of the output


def test_set_basis_finds_state_inside_nnx_free_nested_containers_and_errors_without_one():
    params = {"w": jnp.zeros(5)}
    tx = optax.multi_transform(
        {"p": optim.adamw_chain(1e-3, projection=optim.project_null_space(2)), "q": optax.adam(1e-3)},
        {"w": "p"},
    )
    state = tx.init(params)
    new = optim.set_basis(state, {"w": _orthonormal(jax.random.key(18), 5, 2)}, beta=0.25)
    assert float(optim.get_basis(new).beta) == 0.25
    with pytest.raises(ValueError, match="NullSpaceState"):
        optim.set_basis(optax.adam(1e-3).init(params), {"w": None})


@pytest.mark.slow
def test_gradient_basis_spans_the_gradients_and_pads():
    k = 5
    key = jax.random.key(19)
    grads = {"a": jax.random.normal(key, (k, 7, 3)), "b": jax.random.normal(jax.random.key(20), (k, 4))}
    bases, ranks = subspace.gradient_basis(grads, energy_eps=1.0, per_block=True, max_rank=8)
    assert bases["a"].shape == (21, 8) and bases["b"].shape == (4, 8)
    assert int(ranks["a"]) == 5 and int(ranks["b"]) == 4
    # every gradient lies in span(U): projecting leaves nothing
    g = grads["a"].reshape(k, -1).T
    np.testing.assert_allclose(g - bases["a"] @ (bases["a"].T @ g), 0.0, atol=1e-5)
    np.testing.assert_allclose(bases["a"].T @ bases["a"], np.diag([1.0] * 5 + [0.0] * 3), atol=1e-5)
    gb, gr = subspace.gradient_basis(grads, energy_eps=1.0, per_block=False, max_rank=6)
    assert gb.shape == (25, 6) and int(gr) == 5
    # energy threshold drops weak directions
    strong = jnp.stack([jnp.eye(10)[0] * 10.0, jnp.eye(10)[1] * 10.0, jnp.eye(10)[2] * 0.01])
    _, r = subspace.gradient_basis({"w": strong}, energy_eps=0.99, normalize=False)
    assert int(r["w"]) == 2


def test_energy_rank_rule():
    s = jnp.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert int(subspace.energy_rank(s, 0.6)) == 1
    assert int(subspace.energy_rank(s, 0.9)) == 2
    assert int(subspace.energy_rank(s, 1.0)) == 3
    assert int(subspace.energy_rank(jnp.zeros(3), 0.9)) == 0


@pytest.mark.slow
def test_representation_basis_protects_clean_inputs():
    key = jax.random.key(21)
    d, r = 12, 4
    mix = jax.random.normal(key, (r, d))
    x = jax.random.normal(jax.random.key(22), (50, r)) @ mix  # clean inputs live in a 4-dim subspace
    pad = jnp.ones((50,)).at[45:].set(0.0)
    x = x.at[45:].set(100.0)  # padding rows must be ignored
    u, k = subspace.representation_basis(x, energy_eps=0.999999, weights=pad, max_rank=6)
    assert u.shape == (d, 6) and int(k) == 4
    np.testing.assert_allclose(x[:45] - (x[:45] @ u) @ u.T, 0.0, atol=1e-4)
    # a GPM-projected kernel update leaves clean pre-activations unchanged
    g = jax.random.normal(jax.random.key(23), (d, 5))
    tx = optim.project_null_space(max_rank=6, mode="rows")
    state = optim.set_basis(tx.init({"k": g}), {"k": u})
    pg, _ = tx.update({"k": g}, state)
    scale = float(jnp.max(jnp.abs(x[:45] @ g)))
    assert float(jnp.max(jnp.abs(x[:45] @ pg["k"]))) <= 1e-5 * scale
    _, kcap = subspace.representation_basis(x[:45], energy_eps=1.0, min_free=10)
    assert int(kcap) == 2


@pytest.mark.slow
def test_inflora_down_projection_is_orthogonal_and_keeps_clean_preactivations():
    d, r = 16, 3
    clean = jax.random.normal(jax.random.key(24), (40, 5)) @ jax.random.normal(jax.random.key(25), (5, d))
    forget = clean[:10] + 3.0 * jax.random.normal(jax.random.key(26), (10, d))
    u, k = subspace.representation_basis(clean, energy_eps=0.999999, max_rank=8)
    assert int(k) == 5
    a = subspace.inflora_init(u, forget, r)
    assert a.shape == (d, r)
    assert float(jnp.max(jnp.abs(u.T @ a))) <= 1e-5
    np.testing.assert_allclose(a.T @ a, jnp.eye(r), atol=1e-5)

    # one Adam step on B only: clean pre-activations x (K + A B) do not move; forget ones do.
    kernel = jax.random.normal(jax.random.key(27), (d, 4))
    b = jnp.zeros((r, 4))

    def loss(b):
        return jnp.sum((forget @ (kernel + a @ b)) ** 2)

    tx = optax.adam(1e-1)
    st = tx.init(b)
    upd, st = tx.update(jax.grad(loss)(b), st)
    b2 = optax.apply_updates(b, upd)
    before, after = clean @ (kernel + a @ b), clean @ (kernel + a @ b2)
    assert float(jnp.max(jnp.abs(after - before))) <= 1e-5 * float(jnp.max(jnp.abs(before)))
    assert float(jnp.max(jnp.abs(forget @ (a @ b2)))) > 1e-2

    # low-rank forget inputs: random complement fill keeps the guarantees
    a1 = subspace.inflora_init(u, forget[:1], r)
    assert float(jnp.max(jnp.abs(u.T @ a1))) <= 1e-5
    np.testing.assert_allclose(a1.T @ a1, jnp.eye(r), atol=1e-5)


@pytest.mark.slow
def test_projected_step_changes_clean_loss_at_second_order_only():
    """Tiny MLP: a step orthogonal to the clean gradient changes the clean loss by O(lr^2), a raw one by O(lr)."""
    with jax.enable_x64(True):
        key = jax.random.key(28)
        kx, kw, kf = jax.random.split(key, 3)
        xc = jax.random.normal(kx, (32, 6), jnp.float64)
        yc = (xc[:, 0] > 0).astype(jnp.int32)
        xf = jax.random.normal(kf, (8, 6), jnp.float64) + 2.0
        yf = jnp.zeros((8,), jnp.int32)
        params = {
            "w1": 0.5 * jax.random.normal(kw, (6, 8), jnp.float64),
            "w2": 0.5 * jax.random.normal(jax.random.key(29), (8, 2), jnp.float64),
        }

        @jax.jit
        def ce(p, x, y):
            logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        clean_grad = jax.grad(ce)(params, xc, yc)
        bases, _ = subspace.gradient_basis(jax.tree.map(lambda g: g[None], clean_grad), 1.0, per_block=False)
        forget_grad = jax.tree.map(lambda g: -g, jax.grad(ce)(params, xf, yf))  # ascent on the forget set
        tx = optim.project_null_space(max_rank=1, mode="global")
        state = optim.set_basis(tx.init(params), bases)
        projected, _ = tx.update(forget_grad, state)
        assert float(optim.subspace_cosine(forget_grad, bases, mode="global")) > 1e-2
        assert float(optim.subspace_cosine(projected, bases, mode="global")) < 1e-6

        base = ce(params, xc, yc)

        @jax.jit
        def delta(direction, lr):
            moved = jax.tree.map(lambda p, d: p - lr * d, params, direction)
            return jnp.abs(ce(moved, xc, yc) - base)

        lrs = (1e-2, 1e-3)
        raw = [float(delta(forget_grad, lr)) for lr in lrs]
        proj = [float(delta(projected, lr)) for lr in lrs]
        assert 5.0 < raw[0] / raw[1] < 20.0  # O(lr): ten times smaller for a ten times smaller step
        assert proj[0] / proj[1] > 50.0  # O(lr^2): a hundred times smaller
        assert proj[0] < 0.1 * raw[0]


def test_subspace_cosine_block_and_invalid_mode():
    u = {"w": jnp.array([3.0, 4.0])}
    b = {"w": jnp.array([[1.0], [0.0]])}
    assert abs(float(optim.subspace_cosine(u, b)) - 0.6) < 1e-6
    assert float(optim.subspace_cosine({"w": jnp.zeros(2)}, b)) == 0.0
    assert optim.basis_rank(b) == {"w": 1}
    with pytest.raises(ValueError, match="mode"):
        optim.project_null_space(mode="columns")


def test_warmup_rule_keeps_the_recorded_step_counts():
    """One warm-up rule (floor of the decimal product): DUP unlearning's warmup_frac=0.1 of T steps is int(0.1 T)
    for every T (what jdup.unlearn computed), and victim training's warmup=0.6 of 5 epochs (or warmup_epochs=3)
    is exactly 3 epochs for every epoch length (what jdup.train's round() gave)."""
    for total in range(0, 20001):
        assert optim.warmup_steps(total, 0.1) == int(0.1 * total)
    for spe in range(1, 4001):
        assert optim.warmup_steps(5 * spe, 0.6) == round(0.6 * 5 * spe) == 3 * spe
        assert optim.warmup_steps(spe, 3.0) == round(3.0 * spe) == 3 * spe
    # the decimal product, not the binary one: 0.7 * 90 is 62.99999999999999 in floating point
    assert optim.warmup_steps(90, 0.7) == 63 and int(0.7 * 90) == 62
    # a fractional product rounds down (training's round() rounded 7.6 up to 8)
    assert optim.warmup_steps(76, 0.1) == 7
    assert optim.warmup_steps(0, 0.5) == 0 and optim.warmup_steps(10, 0.0) == 0


def test_two_stream_chain_is_a_transform_over_the_pair_of_gradients():
    """The two-stream optimizer is an optax.GradientTransformation: its update takes (forget, retain) gradients
    and returns the sum of a projected AdamW update of the first and a free AdamW update of the second, each with
    its own clip and moments (the same numbers as the two chains run separately, step after step)."""
    n = 12
    basis = _orthonormal(jax.random.key(30), n, 3)
    proj = optim.project_null_space(max_rank=3, mode="global", bases=basis)
    schedule = optim.linear_warmup_decay(0.1, 6, 2)
    tx = optim.two_stream_chain(schedule, 0.05, clip=1.0, projection=proj)
    assert isinstance(tx, optax.GradientTransformation)
    forget = optim.adamw_chain(schedule, clip=1.0, projection=proj)
    retain = optim.adamw_chain(0.05, clip=1.0)
    params = {"w": jnp.zeros(n)}
    state = tx.init(params)
    s_f, s_r = forget.init(params), retain.init(params)
    update = jax.jit(tx.update)
    for t in range(4):
        g_f = {"w": 3.0 * jax.random.normal(jax.random.key(31 + t), (n,))}
        g_r = {"w": jax.random.normal(jax.random.key(41 + t), (n,))}
        u, state = update((g_f, g_r), state, params)
        u_f, s_f = forget.update(g_f, s_f, params)
        u_r, s_r = retain.update(g_r, s_r, params)
        want = np.asarray(u_f["w"] + u_r["w"])
        # jitted against eager: float32 rounding of a sum whose terms may cancel, so the tolerance is relative to the
        # update's scale (a swapped or unprojected stream would differ by ~1e-2)
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        if t >= 1:  # lr 0 at the first update; afterwards the forget part is orthogonal to the basis, the sum not
            assert _ratio(u_f, basis, "global") <= 1e-5 and _ratio(u, basis, "global") > 1e-3
    assert int(optim.get_basis(state).count) == 4  # set_basis / get_basis find the projection inside the pair
