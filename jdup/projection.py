"""UPGP projected unlearning: the clean subspace an unlearning update must not move, as an optax transform + hook.

Plugs into :func:`jdup.unlearn.unlearn` through its projection slot (``clip -> scale_by_adam -> projection ->
-lr``, :func:`jdup.optim.two_stream_chain`) and its ``on_step`` hook. Only the forgetting update is projected; the
retain (clean CE) update runs in a separate, unprojected optimizer stream (docs/upgp-method.md §5.6), which keeps only the
variant's structure (``ProjectionHook.retain_projection``):

* ``gradient``: block-wise (or global) basis of ``k`` clean mini-batch gradients of the retain loss over the
  trainable (LoRA + head) parameters, energy threshold ``eps``, refreshed every ``refresh`` steps;
* ``representation``: GPM basis of each adapted module's clean token inputs; LoRA down-projections ``A`` are put
  into (and their updates kept in) the orthogonal complement, the head kernel is projected on its input side, the
  head bias is frozen, the up-projections ``B`` train freely: clean pre-activations do not move;
* ``inflora``: ``A`` fixed to the top directions of the flagged inputs inside that complement (InfLoRA), only
  ``B`` (and the protected head) train.

The hook logs per step ``sens_before``/``sens_after`` (cosine between the update and the protected subspace before
and after projection) and ``clean_loss``/``clean_loss_change`` on a fixed clean probe batch.

:func:`build_projection` receives the unlearning student (it builds none itself) and the tokenised retain/forget
rows; this module imports no stage and nothing of ``jdup.unlearn``. Basis estimators: :mod:`jdup.subspace`; the
transform: :func:`jdup.optim.project_null_space`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdup import data as D
from jdup import lora as lora_lib
from jdup import losses, optim, subspace
from jdup.errors import Invalid, JdupError
from jdup.predict import MODEL_INPUTS, model_inputs
from jdup.sensitivity import mean_grad
from jdup.settings import PROJECTIONS, ProjectionOptions

log = logging.getLogger("jdup.projection")


__all__ = [
    "PROJECTIONS",
    "ProjectionOptions",
    "ProjectionHook",
    "build_projection",
    "clean_gradient_stack",
    "module_input_covariances",
]


# ---------------------------------------------------------------------------------------------------------------
# Clean-subspace estimation
# ---------------------------------------------------------------------------------------------------------------


def _fixed_batches(encoded: D.Encoded, batch_size: int, count: int, seed: int, length: int | None = None):
    """``count`` batches of ``batch_size`` rows, all padded to one length (one compiled shape)."""
    length = length or encoded.bucket_for(int(encoded.lengths.max()))
    out = []
    epoch = 0
    while len(out) < count:
        for b in D.batches(encoded, batch_size, shuffle=True, seed=seed, epoch=epoch):
            s = b["input_ids"].shape[1]
            batch = {}
            for kk in MODEL_INPUTS:
                x = b[kk]
                fill = encoded.pad_id if kk == "input_ids" else 0
                batch[kk] = np.pad(x, ((0, 0), (0, length - s)), constant_values=fill) if s < length else x
            batch["labels"] = b["labels"].astype(np.int32)
            batch["mask"] = b["valid"].astype(np.float32)
            out.append(batch)
            if len(out) == count:
                break
        epoch += 1
    return out


def clean_gradient_stack(graphdef, trainable, frozen, retain: D.Encoded, k: int, batch_size: int, seed: int):
    """``k`` mini-batch gradients of the clean CE (dropout off) w.r.t. ``trainable``, stacked on axis 0.

    All batches are padded to one length so the gradient function compiles once.
    """
    grads = [mean_grad(graphdef, trainable, frozen, b) for b in _fixed_batches(retain, batch_size, k, seed)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *grads)


_CAPTURE_LOCK = threading.Lock()


@functools.partial(jax.jit, static_argnums=0)
def _input_covariances(graphdef, states, batch):
    """Uncentred covariance ``sum x x^T`` of the inputs of every ``nnx.Linear`` over real tokens of ``batch``."""
    model = nnx.merge(graphdef, *states)
    paths = {
        id(node): "/".join(map(str, p)) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)
    }
    records: dict[str, jax.Array] = {}
    original = nnx.Linear.__call__

    def recording_call(self, x, *args, **kwargs):
        p = paths.get(id(self))
        if p is not None and p not in records:
            records[p] = x
        return original(self, x, *args, **kwargs)

    nnx.Linear.__call__ = recording_call
    try:
        model(*(batch[k] for k in MODEL_INPUTS), deterministic=True)
    finally:
        nnx.Linear.__call__ = original
    row = batch["mask"].astype(jnp.float32)
    tok = batch["attention_mask"].astype(jnp.float32) * row[:, None]
    out = {}
    hi = jax.lax.Precision.HIGHEST
    for p, x in records.items():
        x = x.astype(jnp.float32)
        if x.ndim == 3:
            xw = x * tok[..., None]
            out[p] = jnp.einsum("bsd,bse->de", xw, x, precision=hi)
        else:
            xw = x * row[:, None]
            out[p] = jnp.einsum("bd,be->de", xw, x, precision=hi)
    return out


def module_input_covariances(
    graphdef, states: tuple, encoded: D.Encoded, *, max_rows: int = 256, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Token-input covariances of every linear layer of a split model over (up to) ``max_rows`` rows.

    Keys are module paths joined by ``/`` (a LoRA layer's base is ``.../query/base``; the head ``classifier``).
    Padding tokens and padding rows are excluded. Accumulated in float64 on the host.
    """
    rows = encoded.subset(np.arange(min(max_rows, len(encoded))))
    total: dict[str, np.ndarray] = {}
    with _CAPTURE_LOCK:
        for b in D.batches(rows, batch_size, sort_by_length=True):
            batch = model_inputs(b)
            batch["mask"] = b["valid"].astype(np.float32)
            covs = _input_covariances(graphdef, tuple(states), batch)
            for p, c in covs.items():
                c = np.asarray(c, np.float64)
                total[p] = c if p not in total else total[p] + c
    return total


# ---------------------------------------------------------------------------------------------------------------
# The transform and the hook
# ---------------------------------------------------------------------------------------------------------------


def _leaf_paths(tree) -> list[tuple]:
    """Plain key paths (str/int) of every array leaf of an NNX state (the Variable ``value`` hop removed)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = []
        for p in path:
            if isinstance(p, jax.tree_util.DictKey):
                keys.append(p.key)
            elif isinstance(p, jax.tree_util.SequenceKey):
                keys.append(p.idx)
            elif isinstance(p, jax.tree_util.GetAttrKey) and p.name != "value":
                keys.append(p.name)
        out.append(tuple(keys))
    return out


def _with_leaves(tree, leaves: list):
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


class ProjectionHook:
    """``on_step`` hook of :func:`jdup.unlearn.unlearn` for a projected run (built by :func:`build_projection`).

    Call protocol: ``hook(StepInfo) -> dict`` after every step (metrics, and ``"opt_state"`` after a basis
    refresh). Before the first step the loop should call ``hook.prepare_student(student) -> trainable`` (puts the
    LoRA down-projections into the clean complement for ``representation``/``inflora``). If the loop does not,
    the first hook call rewrites the down-projections in place in the loop's current state (a fallback: with a
    warm-up schedule the first update has learning rate 0, so nothing is lost).
    """

    def __init__(
        self,
        kind: str,
        opts: ProjectionOptions,
        graphdef,
        frozen,
        retain: D.Encoded,
        seed: int,
        new_a: dict | None,
        probe: dict,
        base_loss: float,
        mode: str,
    ):
        self.kind = kind
        self.opts = opts
        self.graphdef = graphdef
        self.frozen = frozen
        self.retain = retain
        self.seed = seed
        self.new_a = new_a or {}
        self.probe = probe
        self.prev_loss = base_loss
        self.mode = mode
        self.prepared = not self.new_a
        self.refreshes = 0  # periodic refreshes (every `refresh` steps)
        self.informative_step: int | None = None  # step of the re-estimate once B left 0 (gradient mode)
        self.leaf_ranks: dict[
            str, int
        ] = {}  # current basis rank per protected leaf ("global" in global mode)
        self.rank_history: list[tuple[int, dict[str, int]]] = []  # (step, leaf_ranks) at every estimation
        self.b_was_zero = False  # gradient mode: the initial basis was estimated at B = 0

    def set_ranks(self, step: int, ranks: dict[str, int]) -> None:
        """Records (and logs at INFO) the basis rank of every protected leaf after an estimation at ``step``."""
        self.leaf_ranks = dict(ranks)
        self.rank_history.append((int(step), dict(ranks)))
        log.info("projection %s basis ranks @%d: %s", self.kind, step, ranks)

    def rank_summary(self) -> dict[str, float]:
        """``basis_rank`` (mean over protected leaves) and, with adapters, ``basis_rank_a_min`` (the smallest rank
        of a LoRA down-projection: 0 means some ``A`` is unprotected)."""
        if not self.leaf_ranks:
            return {}
        out = {"basis_rank": float(np.mean(list(self.leaf_ranks.values())))}
        a = [r for p, r in self.leaf_ranks.items() if p.endswith("lora_a")]
        if a:
            out["basis_rank_a_min"] = float(min(a))
        return out

    def _rewrite_a(self, trainable) -> Any:
        leaves = jax.tree.leaves(trainable)
        paths = _leaf_paths(trainable)
        new = [self._new_value(p, x) if p in self.new_a else x for p, x in zip(paths, leaves, strict=True)]
        return _with_leaves(trainable, new)

    def _new_value(self, path: tuple, current: jax.Array) -> jax.Array:
        """``set``: the stored InfLoRA ``A``; ``perp``: the current ``A`` projected into the complement
        (idempotent, so a resumed run keeps what ``A`` learned)."""
        how, value = self.new_a[path]
        if how == "set":
            return jnp.asarray(value, current.dtype)
        a = jnp.asarray(current, jnp.float32)
        return (a - value @ (value.T @ a)).astype(current.dtype)

    def prepare_student(self, student) -> Any:
        """The trainable state to start from (down-projections moved into the complement when needed)."""
        self.prepared = True
        return self._rewrite_a(student.trainable)

    def _rewrite_in_place(self, trainable) -> None:
        variables = jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
        paths = _leaf_paths(trainable)
        for p, var in zip(paths, variables, strict=True):
            if p in self.new_a and isinstance(var, nnx.Variable):
                var.set_value(self._new_value(p, var.get_value()))

    def __call__(self, info) -> dict:
        rec: dict[str, Any] = {}
        trainable = info.student.trainable
        if not self.prepared:
            log.warning(
                "projection: the unlearning loop did not call prepare_student; moving LoRA A into the clean "
                "complement in place after step %d",
                info.step,
            )
            self._rewrite_in_place(trainable)
            self.prepared = True
        ns = optim.get_basis(info.opt_state)
        rec["sens_before"] = float(ns.cos_in)
        rec["sens_after"] = float(ns.cos_out)
        if self.opts.log_every and info.step % self.opts.log_every == 0:
            loss = float(_probe_loss(self.graphdef, trainable, self.frozen, self.probe))
            rec["clean_loss"] = loss
            rec["clean_loss_change"] = loss - self.prev_loss
            self.prev_loss = loss
        if self.kind == "gradient":
            periodic = bool(self.opts.refresh) and info.step % self.opts.refresh == 0
            # A's clean gradient is 0 while B = 0: re-estimate once B has left 0 (and no refresh happened yet in
            # this run -- the count lives in the optimizer state, so a resumed run does not redo it).
            informative = (
                self.opts.informative_refresh
                and self.b_was_zero
                and int(ns.refreshes) == 0
                and _any_lora_b_nonzero(trainable)
            )
            if periodic or informative:
                stack = clean_gradient_stack(
                    self.graphdef,
                    trainable,
                    self.frozen,
                    self.retain,
                    self.opts.k,
                    self.opts.basis_batch_size,
                    self.seed + info.step,
                )
                bases, ranks = subspace.gradient_basis(
                    stack, self.opts.eps, per_block=self.opts.per_block, max_rank=self.opts.k
                )
                rec["opt_state"] = optim.set_basis(info.opt_state, bases)
                self.set_ranks(info.step, _rank_dict(trainable, ranks, self.opts.per_block))
                if periodic:
                    self.refreshes += 1
                else:
                    self.informative_step = info.step
            rec.update(self.rank_summary())
        return rec


def _rank_dict(trainable, ranks, per_block: bool) -> dict[str, int]:
    """``{leaf path: rank}`` from :func:`jdup.subspace.gradient_basis` ranks (one ``"global"`` entry in global
    mode)."""
    if not per_block:
        return {"global": int(ranks)}
    leaves = jax.tree.leaves(ranks)
    return {"/".join(map(str, p)): int(r) for p, r in zip(_leaf_paths(trainable), leaves, strict=True)}


def _any_lora_b_nonzero(trainable) -> bool:
    return any(
        bool(np.any(np.asarray(x) != 0))
        for p, x in zip(_leaf_paths(trainable), jax.tree.leaves(trainable), strict=True)
        if p and p[-1] == "lora_b"
    )


@functools.partial(jax.jit, static_argnums=0)
def _probe_loss(graphdef, trainable, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(*(batch[k] for k in MODEL_INPUTS), deterministic=True).logits
    return losses.cross_entropy(logits, batch["labels"], batch["mask"])


def _module_of(path: tuple) -> str:
    return "/".join(map(str, path[:-1]))


def _lora_rank(trainable) -> int:
    """The LoRA rank ``r`` (columns of the first ``lora_a`` leaf; 0 without adapters)."""
    for path, x in zip(_leaf_paths(trainable), jax.tree.leaves(trainable), strict=True):
        if path and path[-1] == "lora_a":
            return int(x.shape[1])
    return 0


def build_projection(
    kind: str,
    options: ProjectionOptions,
    student: Any,
    *,
    retain: D.Encoded,
    forget: D.Encoded | None = None,
    seed: int = 0,
):
    """Projection transform and ``on_step`` hook for :func:`jdup.unlearn.unlearn` (``UnlearnConfig.projection``).

    Args:
      kind: ``none`` | ``gradient`` | ``representation`` | ``inflora``.
      options: :class:`ProjectionOptions` (``UnlearnConfig.projection_options``).
      student: the unlearning student (``jdup.unlearn.Student``: ``model``, ``graphdef``, ``trainable``,
        ``frozen``) at its initial state; the bases are estimated there.
      retain: tokenised labelled clean rows (the retain set).
      forget: tokenised flagged rows (``inflora`` only).
      seed: seed of the probe batch, the clean mini-batches and the InfLoRA fill (the unlearning seed).

    Returns:
      ``(transform, hook)``: an ``optax.GradientTransformation`` for the slot after ``scale_by_adam`` (bases
      already estimated at the initial student), and a :class:`ProjectionHook`; ``(None, None)`` for ``none``.
    """
    if kind in ("", "none", None):
        return None, None
    if kind not in PROJECTIONS:
        raise JdupError(f"projection must be one of {list(PROJECTIONS)}, got {kind!r}")
    if not isinstance(options, ProjectionOptions):
        raise TypeError(f"options must be a ProjectionOptions, got {type(options).__name__}")
    try:
        options.validate()
    except Invalid as e:
        raise JdupError(f"projection_options.{e}") from None
    opts = options
    if len(retain) == 0:
        raise JdupError("projected unlearning needs labelled clean rows (the retain set is empty)")
    graphdef, trainable, frozen = student.graphdef, student.trainable, student.frozen
    seed = int(seed)
    probe = _fixed_batches(
        retain.subset(np.arange(min(opts.probe_rows, len(retain)))),
        min(opts.probe_rows, len(retain)),
        1,
        seed,
    )[0]
    new_a: dict = {}
    module_bases: dict = {}
    retain_projection = None
    t0 = time.perf_counter()
    if kind == "gradient":
        stack = clean_gradient_stack(graphdef, trainable, frozen, retain, opts.k, opts.basis_batch_size, seed)
        bases, ranks = subspace.gradient_basis(stack, opts.eps, per_block=opts.per_block, max_rank=opts.k)
        mode = "block" if opts.per_block else "global"
        tx = optim.project_null_space(opts.k, opts.beta, mode=mode, bases=bases)
        rank_info = float(np.mean([int(r) for r in jax.tree.leaves(ranks)]))
        leaf_ranks = _rank_dict(trainable, ranks, opts.per_block)
    else:
        mode = "rows"
        covs = module_input_covariances(graphdef, (trainable, frozen), retain, max_rows=opts.repr_rows)
        fcovs = {}
        if kind == "inflora":
            if forget is None or len(forget) == 0:
                raise JdupError("inflora projection needs flagged rows (the forget set is empty)")
            fcovs = module_input_covariances(graphdef, (trainable, frozen), forget, max_rows=opts.forget_rows)
        heads = set(lora_lib.head_names(student.model))
        rank = _lora_rank(trainable)
        min_free = opts.min_free or max(16, 4 * rank)
        leaves = jax.tree.leaves(trainable)
        cache: dict[str, tuple] = {}
        bases_leaves, ranks = [], []
        leaf_ranks = {}
        retain_leaves = []  # structural constraints only (A in the complement / frozen, frozen head bias)
        for path, x in zip(_leaf_paths(trainable), leaves, strict=True):
            module, pname = _module_of(path), path[-1]
            if pname == "lora_a":
                cov_key = module + "/base"
                if cov_key not in covs:
                    raise JdupError(f"no captured inputs for LoRA module {module!r}")
                if cov_key not in cache:
                    cache[cov_key] = subspace.covariance_basis(
                        covs[cov_key], opts.repr_eps, min_free=min_free
                    )
                u, r = cache[cov_key]
                ranks.append(int(r))
                leaf_ranks["/".join(map(str, path))] = int(r)
                if kind == "representation":
                    new_a[path] = ("perp", np.asarray(u))  # A <- (I - U U^T) A, applied to the current A
                    bases_leaves.append(u)
                else:  # inflora: A fixed inside the complement, its updates fully removed
                    new_a[path] = (
                        "set",
                        np.asarray(
                            subspace.inflora_from_covariance(
                                u, fcovs[cov_key], x.shape[1], key=jax.random.key(seed)
                            )
                        ),
                    )
                    bases_leaves.append(jnp.eye(x.shape[0], dtype=jnp.float32))
                retain_leaves.append(bases_leaves[-1])
            elif pname == "lora_b":
                bases_leaves.append(None)
                retain_leaves.append(None)
            elif str(path[0]) in heads:
                if x.ndim >= 2:
                    if module not in covs:
                        raise JdupError(f"no captured inputs for head module {module!r}")
                    u, r = subspace.covariance_basis(
                        covs[module], opts.repr_eps, min_free=min(min_free, x.shape[0] // 2)
                    )
                    ranks.append(int(r))
                    leaf_ranks["/".join(map(str, path))] = int(r)
                    bases_leaves.append(u)
                    retain_leaves.append(None)  # the retain stream may move the head freely
                else:
                    n = int(np.prod(x.shape))
                    bases_leaves.append(jnp.eye(n, dtype=jnp.float32) if opts.freeze_head_bias else None)
                    retain_leaves.append(bases_leaves[-1])
            else:
                bases_leaves.append(None)
                retain_leaves.append(None)
        bases = _with_leaves(trainable, bases_leaves)
        retain_projection = optim.project_null_space(
            0, opts.beta, mode="rows", bases=_with_leaves(trainable, retain_leaves), track=False
        )
        module_bases = {k[: -len("/base")]: v[0] for k, v in cache.items()}
        tx = optim.project_null_space(0, opts.beta, mode="rows", bases=bases)
        rank_info = float(np.mean(ranks)) if ranks else 0.0
    base_loss = float(_probe_loss(graphdef, trainable, frozen, probe))
    log.info("projection %s: mean basis rank %.1f, built in %.1fs", kind, rank_info, time.perf_counter() - t0)
    hook = ProjectionHook(kind, opts, graphdef, frozen, retain, seed, new_a, probe, base_loss, mode)
    hook.initial_rank = rank_info
    hook.set_ranks(0, leaf_ranks)
    hook.b_was_zero = kind == "gradient" and not _any_lora_b_nonzero(trainable)
    hook.module_bases = module_bases  # representation/inflora: clean-input basis U [d, d] per LoRA module
    # jdup.unlearn runs the retain (clean CE) update in a separate, unprojected stream (docs/upgp-method.md §5.6); it still has
    # to respect the variant's structure (representation: A stays in the clean complement; inflora: A and the
    # head bias frozen), else a retain step would undo what makes the forget stream safe. None for gradient.
    hook.retain_projection = retain_projection
    return tx, hook
