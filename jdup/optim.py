"""jdup's optimizers: the one AdamW factory, its two-stream variant, the warm-up rule and schedule, and
null-space gradient projection as an optax transform (the "P" of UPGP).

:func:`adamw_chain` is the only optimizer factory (victim training, unlearning, sweeps), :func:`two_stream_chain`
its UPGP variant (projected forget stream + free retain stream), :func:`warmup_steps` the only warm-up rule and
:func:`linear_warmup_decay` the only schedule. The basis estimators are in :mod:`jdup.subspace`.

The transform maps an update ``u`` to ``u - beta * U (U^T u)`` where ``U`` has orthonormal columns spanning the
directions that must not move (clean-sample gradients, or clean layer inputs). ``U`` lives in the transform's
**state**, never in a closure, so refreshing it (:func:`set_basis`) keeps every shape and dtype and does not
recompile a jitted step. Bases are zero-padded to a fixed width ``max_rank``: zero columns project nothing.

Three ways of attaching a basis to the update pytree (``mode``):

* ``"block"`` (default): one ``[leaf.size, k]`` basis per parameter leaf, acting on the flattened leaf. This is
  the block-wise gradient-space projection (docs/upgp-method.md §5.2, block-wise G2): the inner product with a clean gradient
  is a sum over blocks, so zeroing each block's component zeroes the total, and it is more conservative than one
  global basis.
* ``"global"``: one ``[P, k]`` basis over the concatenation of all leaves (``jax.tree.leaves`` order, each
  leaf flattened row-major) -- the literal UPGP/OGD reading.
* ``"rows"``: one ``[leaf.shape[0], k]`` basis per leaf acting on the leading (input) axis, ``G' = G - U (U^T G)``.
  This is the representation-space (GPM) projection of a Flax ``[in, out]`` kernel or a LoRA down-projection
  ``A [in, r]``: clean inputs ``x`` in ``span(U)`` then see no change, ``x (G - U U^T G) = 0``. (Flax kernels are
  ``[in, out]``, so this is a *left* multiply; PyTorch GPM code multiplies on the right -- docs/upgp-method.md §5.4.)

Optimizer order (docs/upgp-method.md §5.5): with Adam the per-coordinate scaling rotates a projected gradient back out of the
complement, so the projection must act on the **final** update: ``clip -> scale_by_adam -> project ->
scale_by_learning_rate`` (:func:`adamw_chain`). Decoupled weight decay moves parameters along ``-theta``,
which is not in the complement, so it is either off or added *before* the projection (then it is projected too).

This module imports only jax, optax and numpy, so another JAX codebase can take it without Flax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "NullSpaceState",
    "project_null_space",
    "set_basis",
    "get_basis",
    "adamw_chain",
    "two_stream_chain",
    "matrices_only",
    "linear_warmup_decay",
    "warmup_steps",
    "schedule_value",
    "project",
    "subspace_cosine",
    "basis_rank",
]

_MODES = ("block", "global", "rows")


class NullSpaceState(NamedTuple):
    """State of :func:`project_null_space`.

    Attributes:
      bases: the protected subspaces. ``"block"``/``"rows"`` mode: a pytree with the structure of the updates whose
        leaves are float32 ``[m, max_rank]`` matrices with orthonormal (or zero) columns, or ``None`` for an
        unprotected leaf. ``"global"`` mode: one float32 ``[P, max_rank]`` matrix.
      beta: ``[]`` float32, the projection strength (``0`` = identity, ``1`` = full projection).
      count: ``[]`` int32, number of updates projected so far.
      refreshes: ``[]`` int32, number of times :func:`set_basis` replaced the bases.
      cos_in: ``[]`` float32, :func:`subspace_cosine` of the last incoming update (the measured "unlearning
        sensitivity" before projection).
      cos_out: ``[]`` float32, the same after projection (``~0`` for ``beta = 1``).
    """

    bases: Any
    beta: jax.Array
    count: jax.Array
    refreshes: jax.Array
    cos_in: jax.Array
    cos_out: jax.Array


# ----------------------------------------------------------------------------------------------- projection math


def _basis_dim(leaf: Any, mode: str) -> int:
    size = int(np.prod(leaf.shape)) if leaf.shape else 1
    if mode == "rows" and len(leaf.shape) >= 2:
        return int(leaf.shape[0])
    return size


def _as_basis(b: Any) -> jax.Array | None:
    """A basis leaf, unwrapped from a single-leaf container (e.g. an NNX ``Variable``); ``None`` if empty."""
    if b is None or hasattr(b, "shape"):
        return b
    leaves = jax.tree.leaves(b)
    return leaves[0] if leaves else None


def _project_leaf(u: jax.Array, basis: jax.Array | None, beta: jax.Array) -> jax.Array:
    """``u - beta U (U^T u)`` with ``u`` reshaped row-major to ``[m, -1]``; computed in float32, cast back."""
    basis = _as_basis(basis)
    if basis is None or basis.shape[-1] == 0:
        return u
    m = basis.shape[0]
    mat = u.reshape(m, -1).astype(jnp.float32)
    coef = jnp.matmul(basis.T, mat, precision=jax.lax.Precision.HIGHEST)
    mat = mat - beta * jnp.matmul(basis, coef, precision=jax.lax.Precision.HIGHEST)
    return mat.reshape(u.shape).astype(u.dtype)


def _flatten_f32(tree: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """Concatenates all leaves (row-major, ``jax.tree.leaves`` order) into one float32 vector.

    Unlike ``jax.flatten_util.ravel_pytree`` the inverse restores each leaf's own dtype.
    """
    leaves, treedef = jax.tree.flatten(tree)
    shapes = [jnp.shape(x) for x in leaves]
    dtypes = [jnp.asarray(x).dtype for x in leaves]
    sizes = [int(np.prod(s)) if s else 1 for s in shapes]
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves]) if leaves else jnp.zeros((0,))

    def unflatten(vec: jax.Array) -> Any:
        out, start = [], 0
        for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
            out.append(vec[start : start + size].reshape(shape).astype(dtype))
            start += size
        return jax.tree.unflatten(treedef, out)

    return flat, unflatten


def _map_bases(fn: Callable, updates: Any, bases: Any) -> Any:
    """``jax.tree.map(fn, updates, bases)`` where ``bases`` may hold ``None`` at a leaf position."""
    u_leaves, treedef = jax.tree.flatten(updates)
    b_leaves = treedef.flatten_up_to(bases)
    return jax.tree.unflatten(treedef, [fn(u, b) for u, b in zip(u_leaves, b_leaves, strict=True)])


def project(updates: Any, bases: Any, beta: float | jax.Array = 1.0, *, mode: str = "block") -> Any:
    """Applies ``u -> u - beta U (U^T u)`` to a pytree of updates (the stateless core of the transform).

    .. math:: u' = (I - \\beta\\, U U^\\top)\\, u

    Args:
      updates: pytree of arrays (any float dtype; each output leaf keeps its input dtype).
      bases: per-leaf ``[m, k]`` orthonormal/zero-column matrices or ``None`` (``"block"``/``"rows"``), or one
        ``[P, k]`` matrix (``"global"``), as described in :class:`NullSpaceState`.
      beta: projection strength in ``[0, 1]``.
      mode: ``"block"``, ``"rows"`` or ``"global"``.

    Returns:
      The projected updates, same structure, shapes and dtypes.
    """
    beta = jnp.asarray(beta, jnp.float32)
    if mode == "global":
        flat, unflatten = _flatten_f32(updates)
        if bases is None or bases.shape[-1] == 0:
            return updates
        coef = jnp.matmul(bases.T, flat, precision=jax.lax.Precision.HIGHEST)
        return unflatten(flat - beta * jnp.matmul(bases, coef, precision=jax.lax.Precision.HIGHEST))
    return _map_bases(lambda u, b: _project_leaf(u, b, beta), updates, bases)


def subspace_cosine(updates: Any, bases: Any, *, mode: str = "block") -> jax.Array:
    """The measured "unlearning sensitivity": ``||U^T u|| / ||u||`` (cosine between ``u`` and ``span(U)``).

    For block/rows bases the numerator sums the squared components over all protected blocks, so the value is the
    cosine between the whole update vector and its projection onto the (block-diagonal) protected subspace.
    ``0`` means the update cannot change the protected quantities to first order; ``1`` means it lies inside.

    Args:
      updates: pytree of arrays.
      bases: as in :func:`project`.
      mode: ``"block"``, ``"rows"`` or ``"global"``.

    Returns:
      ``[]`` float32 in ``[0, 1]`` (``0`` for a zero update).
    """
    if mode == "global":
        flat, _ = _flatten_f32(updates)
        num = jnp.sum(jnp.square(bases.T @ flat)) if bases is not None else jnp.zeros(())
        den = jnp.sum(jnp.square(flat))
    else:
        u_leaves, treedef = jax.tree.flatten(updates)
        b_leaves = treedef.flatten_up_to(bases)
        num = jnp.zeros((), jnp.float32)
        den = jnp.zeros((), jnp.float32)
        for u, b in zip(u_leaves, b_leaves, strict=True):
            b = _as_basis(b)
            u32 = jnp.asarray(u, jnp.float32)
            den = den + jnp.sum(jnp.square(u32))
            if b is not None and b.shape[-1] > 0:
                coef = jnp.matmul(b.T, u32.reshape(b.shape[0], -1), precision=jax.lax.Precision.HIGHEST)
                num = num + jnp.sum(jnp.square(coef))
    return jnp.where(den > 0, jnp.sqrt(num / jnp.maximum(den, 1e-30)), 0.0)


def basis_rank(bases: Any, tol: float = 1e-6) -> Any:
    """Number of non-zero columns per basis (a pytree of ints; ``None`` leaves count 0)."""

    def rank(b):
        if b is None:
            return 0
        return int(np.sum(np.linalg.norm(np.asarray(b, np.float32), axis=0) > tol))

    return jax.tree.map(rank, bases, is_leaf=lambda x: x is None)


# -------------------------------------------------------------------------------------------------- transform


def project_null_space(
    max_rank: int = 32,
    beta: float = 1.0,
    *,
    mode: str = "block",
    mask: Any | Callable[[Any], Any] | None = None,
    bases: Any = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Projects updates onto the orthogonal complement of a basis held in the state.

    .. math:: u \\mapsto u - \\beta\\, U (U^\\top u)

    ``init`` allocates zero bases of width ``max_rank`` (so the transform is the identity until a basis is set
    with :func:`set_basis`), unless ``bases`` is given. Place it *after* any adaptive scaling (``scale_by_adam``)
    and before ``scale_by_learning_rate``; see :func:`adamw_chain`.

    Args:
      max_rank: fixed number of basis columns (estimators zero-pad to it, so refreshing never changes a shape).
      beta: initial projection strength in ``[0, 1]`` (soft projection for ``beta < 1``); kept in the state.
      mode: ``"block"`` (per-leaf basis on the flattened leaf), ``"rows"`` (per-leaf basis on the leading/input
        axis, GPM) or ``"global"`` (one basis over all leaves concatenated).
      mask: optional pytree of bools (or a callable ``params -> pytree of bools``) selecting the protected leaves
        in ``"block"``/``"rows"`` mode; unprotected leaves get a ``None`` basis and pass through unchanged.
      bases: optional initial bases (same layout as :attr:`NullSpaceState.bases`); their width sets the rank.
      track: record the subspace cosine of the update before/after projection in the state (``cos_in``,
        ``cos_out``; two extra ``k x n`` products per step) for logging.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`NullSpaceState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = project_null_space(max_rank=1, mode="global")
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> state = set_basis(state, jnp.array([[1.0], [0.0]]))
      >>> tx.update({"w": jnp.array([3.0, 4.0])}, state)[0]["w"]
      Array([0., 4.], dtype=float32)
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")

    def init_fn(params):
        if bases is not None:
            init_bases = jax.tree.map(lambda b: jnp.asarray(b, jnp.float32), bases)
        elif mode == "global":
            total = sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params))
            init_bases = jnp.zeros((total, max_rank), jnp.float32)
        else:
            m = mask(params) if callable(mask) else mask
            leaves, treedef = jax.tree.flatten(params)
            keep = [True] * len(leaves) if m is None else treedef.flatten_up_to(m)
            init_bases = jax.tree.unflatten(
                treedef,
                [
                    jnp.zeros((_basis_dim(x, mode), max_rank), jnp.float32) if k else None
                    for x, k in zip(leaves, keep, strict=True)
                ],
            )
        return NullSpaceState(
            bases=init_bases,
            beta=jnp.asarray(beta, jnp.float32),
            count=jnp.zeros((), jnp.int32),
            refreshes=jnp.zeros((), jnp.int32),
            cos_in=jnp.zeros((), jnp.float32),
            cos_out=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None):
        del params
        new_updates = project(updates, state.bases, state.beta, mode=mode)
        cos_in = subspace_cosine(updates, state.bases, mode=mode) if track else state.cos_in
        cos_out = subspace_cosine(new_updates, state.bases, mode=mode) if track else state.cos_out
        return new_updates, state._replace(
            count=optax.safe_increment(state.count), cos_in=cos_in, cos_out=cos_out
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _is_ns(x: Any) -> bool:
    return isinstance(x, NullSpaceState)


def set_basis(opt_state: Any, bases: Any = None, *, beta: float | None = None) -> Any:
    """Returns ``opt_state`` with the bases (and optionally ``beta``) of every :class:`NullSpaceState` replaced.

    Works on any optimizer state pytree that contains a :class:`NullSpaceState` (a bare one, inside
    ``optax.chain`` tuples, ``multi_transform`` dicts, ...). Shapes and dtypes must match the old bases, which
    is what keeps a jitted update from recompiling; a mismatch raises ``ValueError``.

    Args:
      opt_state: the optimizer state.
      bases: new bases in the layout of :attr:`NullSpaceState.bases` (``None`` keeps the current ones).
      beta: new projection strength, or ``None`` to keep it.

    Returns:
      The new optimizer state (the input is not modified).
    """

    def replace(node):
        if not _is_ns(node):
            return node
        new = node
        if bases is not None:
            old_leaves, treedef = jax.tree.flatten(node.bases)
            try:
                new_leaves = treedef.flatten_up_to(bases)
            except (ValueError, TypeError) as e:
                raise ValueError(f"new bases do not have the structure of the old ones: {e}") from None
            out = []
            for old, b in zip(old_leaves, new_leaves, strict=True):
                b = jnp.asarray(b, old.dtype)
                if b.shape != old.shape:
                    raise ValueError(
                        f"basis shape {b.shape} != {old.shape}; pad to the transform's max_rank so a refresh "
                        "never changes shapes (and never recompiles)"
                    )
                out.append(b)
            new = new._replace(bases=jax.tree.unflatten(treedef, out), refreshes=node.refreshes + 1)
        if beta is not None:
            new = new._replace(beta=jnp.asarray(beta, node.beta.dtype))
        return new

    found = []

    def visit(node):
        if _is_ns(node):
            found.append(node)
        return node

    jax.tree.map(visit, opt_state, is_leaf=_is_ns)
    if not found:
        raise ValueError("no NullSpaceState in this optimizer state (was project_null_space in the chain?)")
    return jax.tree.map(replace, opt_state, is_leaf=_is_ns)


def get_basis(opt_state: Any) -> NullSpaceState:
    """Returns the first :class:`NullSpaceState` found in an optimizer state (for logging and tests)."""
    found = []
    jax.tree.map(lambda n: found.append(n) if _is_ns(n) else None, opt_state, is_leaf=_is_ns)
    if not found:
        raise ValueError("no NullSpaceState in this optimizer state")
    return found[0]


# ----------------------------------------------------------------------------------------- schedule, factories


def linear_warmup_decay(peak: Any, total_steps: Any, warmup_steps: Any) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    Identical to Hugging Face ``get_linear_schedule_with_warmup``: the value at optimizer step ``t`` (0-based, as
    optax counts) is ``peak * t / warmup`` while ``t < warmup``, else
    ``peak * max(0, (total - t) / (total - warmup))``; so the first update uses learning rate 0.

    Args:
      peak: the peak learning rate: a Python float or a (traced) float32 array -- the same float32 value gives
        the same schedule either way, so a vmapped sweep can carry one ``peak`` per cell.
      total_steps: optimizer steps of the run (Python int).
      warmup_steps: warm-up steps (Python int).

    Returns:
      ``count -> float32`` learning rate.
    """
    total = int(total_steps)
    warm = int(warmup_steps)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        up = t / max(warm, 1)
        down = jnp.maximum(0.0, (total - t) / max(total - warm, 1))
        return peak * jnp.where(t < warm, up, down)

    return schedule


def warmup_steps(total_steps: int, fraction: float) -> int:
    """The one warm-up rule: ``floor(fraction * total_steps)`` optimizer steps, the product taken on the decimal
    value of ``fraction`` (``0.7 * 90`` is 63, where binary floating point gives ``62.99999999999999``).

    Unlearning's ``warmup_frac`` of ``T`` steps gives ``int(0.1 T)`` as DUP (``num_warmup_steps =
    int(0.1 * num_training_steps)``); victim training's ``warmup = 0.6`` of 5 epochs gives its 3 epochs exactly;
    ``warmup_epochs`` counts in epochs: ``warmup_steps(steps_per_epoch, warmup_epochs)`` (``fraction`` may exceed 1).

    Args:
      total_steps: the steps the fraction is taken of (Python int).
      fraction: a non-negative Python float.

    Returns:
      The warm-up length in optimizer steps.
    """
    return math.floor(Fraction(repr(float(fraction))) * int(total_steps))


def schedule_value(peak: float, total_steps: int, warmup_steps: int, t: int) -> float:
    """:func:`linear_warmup_decay` at step ``t`` in plain Python (for logging, no device work)."""
    if t < warmup_steps:
        return peak * t / max(warmup_steps, 1)
    return peak * max(0.0, (total_steps - t) / max(total_steps - warmup_steps, 1))


def matrices_only(params: Any) -> Any:
    """Weight-decay mask of the usual Hugging Face grouping: leaves with 2+ dimensions (kernels, embeddings) decay,
    biases and LayerNorm scales do not (``mask=`` of :func:`adamw_chain`)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def adamw_chain(
    learning_rate: float | jax.Array | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
    projection: optax.GradientTransformation | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """jdup's one optimizer: ``clip -> scale_by_adam -> [decay] -> [projection] -> -lr``.

    Without a projection this is exactly torch ``AdamW`` (decoupled decay ``lr * wd * theta``) after
    ``clip_grad_norm_`` -- the optimizer of victim training, of DUP unlearning and of every sweep cell.

    Why this order with a projection (docs/upgp-method.md §5.5): Adam divides each coordinate by its own running RMS, which
    rotates a vector; a gradient projected *before* Adam therefore leaves the complement again (measured
    ``max|U^T u|/|u|`` ~ 0.1), while projecting the *final* Adam direction keeps every step exactly orthogonal to
    the protected basis. Clipping goes first because it only rescales the raw gradient and the projection never
    increases a norm. Weight decay, if any, is added before the projection so the decay term is projected too
    (decoupled decay after it would move parameters along ``-theta``, out of the complement; jdup's unlearning
    passes ``weight_decay=0`` when projecting). Retain-loss updates belong in a separate, unprojected stream
    (:func:`two_stream_chain`).

    Args:
      learning_rate: a float, a (traced) float32 array, or an optax schedule (e.g. :func:`linear_warmup_decay`,
        whose ``peak`` may itself be traced).
      weight_decay: decoupled weight decay coefficient (``0`` = none).
      clip: global-norm clip of the raw gradient; ``None`` or ``0`` disables it.
      projection: a :func:`project_null_space` transform (or any transform) acting on the final Adam direction.
      mask: weight-decay mask: a pytree of bools or a callable ``params -> pytree of bools`` (``None``: all).
      b1, b2, eps: Adam parameters (torch defaults).

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.chain``).
    """
    parts = []
    if clip:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    if projection is not None:
        parts.append(projection)
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def two_stream_chain(
    forget_lr: float | jax.Array | optax.Schedule,
    retain_lr: float | jax.Array | optax.Schedule,
    *,
    clip: float | None = 1.0,
    projection: optax.GradientTransformation | None = None,
    retain_projection: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """Two optimizer streams whose updates are added (docs/upgp-method.md §5.6), as one transform over a
    **pair-structured gradient**.

    ``update((forget_grads, retain_grads), state, params)`` runs the forgetting gradient through
    ``clip -> scale_by_adam -> projection -> -forget_lr`` and the clean-CE gradient through its own
    ``clip -> scale_by_adam -> [retain_projection] -> -retain_lr``, each with its own clip and Adam moments, and
    returns the **sum** of the two updates (one tree with the structure of ``params``). The state is the pair
    ``(forget_state, retain_state)``; :func:`set_basis` / :func:`get_basis` find the projection state inside it.
    A single projected stream would project the retain gradient too, and that gradient lies almost entirely in
    the protected (clean) subspace, so the retain term would be switched off.

    Both streams are :func:`adamw_chain` without weight decay (the decay direction ``-theta`` is not in the
    protected complement). The loss weights belong in the stream learning rates (``lr * lambda``), not on the
    gradients: Adam is invariant to a gradient scale, so a weight on the gradient would do nothing.

    Args:
      forget_lr, retain_lr: learning rate (or schedule) of each stream.
      clip: global-norm clip of each stream's raw gradient.
      projection: the clean-subspace projection of the forget stream.
      retain_projection: NOT the clean-subspace projection: only *structural* constraints of a projection
        variant that every update must respect (InfLoRA's frozen down-projections and head bias, the
        representation variant's down-projections kept in the clean complement); ``None`` for a free retain
        stream.

    Returns:
      An ``optax.GradientTransformation`` whose updates are the pair ``(forget, retain)`` on the way in and one
      summed update on the way out.
    """
    forget = adamw_chain(forget_lr, clip=clip, projection=projection)
    retain = adamw_chain(retain_lr, clip=clip, projection=retain_projection)

    def init_fn(params):
        return (forget.init(params), retain.init(params))

    def update_fn(grads, state, params=None):
        g_forget, g_retain = grads
        u_f, s_f = forget.update(g_forget, state[0], params)
        u_r, s_r = retain.update(g_retain, state[1], params)
        return jax.tree.map(jnp.add, u_f, u_r), (s_f, s_r)

    return optax.GradientTransformation(init_fn, update_fn)
