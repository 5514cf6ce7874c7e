"""The one loader and exporter: checkpoints -> jdup classifiers -> Hugging Face folders, for every family.

The loader knows nothing about any family: a reader returns ``(hf_config, tensors)`` -- :func:`jdup.models.readers
.read_folder` for Hugging Face folders (safetensors, ``pytorch_model.bin``), :func:`jdup.models.gguf.read_gguf` for
llama.cpp files -- and :func:`from_checkpoint` picks the :class:`~jdup.models.registry.Arch` registered for its
``model_type``, converts the config, and maps tensors with that Arch's :class:`~jdup.models.registry.KeyRule`
table. Importing this module registers every family (``encoder_params``, ``decoder_params``, ``bart_params``).

Public functions:

* :func:`from_pretrained` -- a ``builtin:`` name, a local folder, a ``.gguf`` file, or a Hub id -> NNX classifier
  (names are resolved by :mod:`jdup.models.hub`); :func:`from_gguf` is the same for GGUF files.
* :func:`from_checkpoint` -- ``(hf_config, tensors)`` from any reader -> NNX classifier.
* :func:`load_state_from_tensors` -- the core: ``(arch, config, {hf_name: np.ndarray}, source_name)`` -> model.
  It builds the model abstractly (``nnx.eval_shape``), places each tensor by the key table (optionally straight
  onto a device mesh), and collects **every** missing, unexpected and mis-shaped tensor into one
  :class:`JdupError`. A missing classification head (``Arch.head_rules``) is initialised as transformers does
  (``normal(0, initializer_range)`` kernels, zero biases) and reported in ``model.load_report``.
* :func:`save_pretrained` -- model -> folder loadable by ``transformers.AutoModelForSequenceClassification``;
  :func:`gguf_to_hf` converts a GGUF decoder to such a folder.

Key matching: legacy ``LayerNorm.gamma``/``LayerNorm.beta`` names are read as ``weight``/``bias`` (as
transformers does); a checkpoint key is then tested against ``Arch.ignore_hf`` (skipped silently), then against the
HF templates (``{i}`` matches a layer index); if nothing matches, each ``Arch.hf_prefixes`` is prepended and tried
again, so a bare backbone save (``BertModel``, e.g. MiniLM) loads into the classifier.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jdup import atomic
from jdup.errors import JdupError
from jdup.models import (  # noqa: F401  (the *_params imports register the families)
    bart_params,
    decoder_params,
    encoder_params,
    gguf,
    hub,
    readers,
    registry,
    sharding,
)
from jdup.models.registry import Arch, KeyRule

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state_from_tensors` did besides plain copying (all tuples, so the report is hashable)."""

    source: str
    arch: str
    loaded: int  # number of parameter tensors copied from the checkpoint
    initialized: tuple[str, ...] = ()  # jdup paths freshly initialised (missing head)
    ignored: tuple[str, ...] = ()  # checkpoint keys skipped by Arch.ignore_hf
    prefixed: bool = False  # True when keys were matched after adding an Arch.hf_prefixes prefix


def arch_for(hf_config: dict, config_path: str | os.PathLike = "config.json") -> Arch:
    """The registered family for ``hf_config["model_type"]``; JdupError listing the supported types otherwise."""
    mt = hf_config.get("model_type")
    arch = registry.for_model_type(mt)
    if arch is None:
        supported = sorted(t for n in registry.names() for t in registry.get(n).hf_model_types)
        raise JdupError(f"model_type {mt!r} is not supported; supported: {', '.join(supported)}", config_path)
    return arch


# ---------------------------------------------------------------------------------------------------------------
# the generic filler


def _template_regex(template: str) -> re.Pattern:
    out, fields = "", []
    for literal, field, _, _ in string.Formatter().parse(template):
        out += re.escape(literal)
        if field is not None:
            if field in fields:
                out += f"(?P={field})"
            else:
                fields.append(field)
                out += f"(?P<{field}>\\d+)"
    return re.compile(out + r"\Z")


class _RuleIndex:
    """Match concrete names against rule templates, both directions."""

    def __init__(self, rules: list[KeyRule]):
        self.rules = rules
        self.hf_re = [_template_regex(r.hf) for r in rules]
        self.jd_re = [_template_regex(r.jdup) for r in rules]

    def hf_to_jdup(self, name: str) -> tuple[KeyRule, str] | None:
        for rule, rx in zip(self.rules, self.hf_re, strict=True):
            m = rx.match(name)
            if m:
                return rule, rule.jdup.format(**m.groupdict())
        return None

    def jdup_to_hf(self, name: str) -> tuple[KeyRule, str] | None:
        for rule, rx in zip(self.rules, self.jd_re, strict=True):
            m = rx.match(name)
            if m:
                return rule, rule.hf.format(**m.groupdict())
        return None


def _flat_params(state) -> dict[str, tuple[tuple, Any]]:
    """``nnx`` state -> ``{"a.b.0.kernel": (key_path, leaf)}`` over the pure dict."""
    out: dict[str, tuple[tuple, Any]] = {}

    def walk(d, path):
        if isinstance(d, Mapping):
            for k, v in d.items():
                walk(v, path + (k,))
        else:
            out[".".join(str(p) for p in path)] = (path, d)

    walk(nnx.to_pure_dict(state), ())
    return out


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _legacy_rename(key: str) -> str:
    """Old TF-converted names that transformers renames on load (``bert-base-uncased`` has them)."""
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def _matches_any(name: str, templates: tuple[str, ...]) -> bool:
    return any(_template_regex(t).match(name) for t in templates)


def load_state_from_tensors(
    arch: Arch | str,
    cfg,
    tensors: Mapping[str, np.ndarray],
    source_name: str,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
    mesh: Mesh | str | None = None,
    fsdp: bool = False,
) -> nnx.Module:
    """Build ``arch``'s model for ``cfg`` and fill it from Hugging Face-named tensors.

    Args:
      arch: a registered :class:`Arch` or its name.
      cfg: the family's config (e.g. from ``arch.config_from_hf``).
      tensors: ``{hf_name: array}`` in Hugging Face layout (torch ``(out, in)`` Linear weights); may be lazy.
      source_name: file named in errors and in the report.
      dtype: compute dtype of the model (float32 / bfloat16).
      param_dtype: storage dtype of the parameters (tensors are cast to it).
      seed: seed of the initialiser for a missing classification head.
      mesh: a ``("data", "model")`` mesh (or a spec such as ``"auto"``, ``"2x4"``, see
        :func:`jdup.mesh.make_mesh`): each tensor goes straight to its shard under
        :data:`jdup.models.sharding.DEFAULT_RULES` (replicated over ``data``, split over ``model``; each process
        builds only its own shards), so no device ever holds more than its part. None: default device.
      fsdp: with ``mesh``, also split parameters along ``data`` (see :func:`jdup.models.sharding.param_spec`).

    Returns:
      The NNX model, with ``model.load_report`` (a :class:`LoadReport`).

    Raises:
      JdupError: one error listing every missing, unexpected and mis-shaped tensor, or a ``num_labels`` that
        disagrees with the checkpoint's head.
    """
    if isinstance(arch, str):
        arch = registry.get(arch)
    from jdup import mesh as mesh_lib  # jdup.mesh imports jdup.models.sharding (this package)

    if isinstance(mesh, (str, int)):
        mesh = mesh_lib.make_mesh(mesh)
    abstract = nnx.eval_shape(
        lambda: arch.build(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    )
    graphdef, state = nnx.split(abstract)
    flat = _flat_params(state)
    index = _RuleIndex(arch.key_rules(cfg))
    ignore = [re.compile(p) for p in arch.ignore_hf]

    values: dict[str, np.ndarray] = {}
    src_of: dict[str, str] = {}
    unexpected, bad_shape, ignored, duplicate = [], [], [], []
    prefixed = False
    for key in tensors:
        base = _legacy_rename(key)
        cands = [base] + [p + base for p in arch.hf_prefixes]
        if any(rx.search(c) for rx in ignore for c in cands):
            ignored.append(key)
            continue
        hit = None
        for c in cands:
            hit = index.hf_to_jdup(c)
            if hit:
                prefixed |= c != key
                break
        if hit is None or hit[1] not in flat:
            unexpected.append(key)
            continue
        rule, jpath = hit
        if jpath in values:
            duplicate.append(f"{key} (also {src_of[jpath]})")
            continue
        arr = rule.transform.to_jdup(np.asarray(tensors[key]))
        want = flat[jpath][1]
        if tuple(arr.shape) != tuple(want.shape):
            want_hf = rule.transform.to_hf(
                np.empty(want.shape, np.float32)
            ).shape  # in the checkpoint's layout
            bad_shape.append((key, jpath, tuple(np.shape(tensors[key])), tuple(want_hf)))
            continue
        values[jpath] = arr
        src_of[jpath] = key

    misshaped = {b[1] for b in bad_shape}
    missing = [p for p in flat if p not in values and p not in misshaped]
    head_missing = [p for p in missing if _matches_any(p, arch.head_rules)]
    head_shape_errors = [b for b in bad_shape if _matches_any(b[1], arch.head_rules)]
    n_labels = getattr(cfg, "num_labels", None)
    if head_shape_errors and not [b for b in bad_shape if b not in head_shape_errors] and not unexpected:
        lines = ", ".join(f"{k} has shape {s}, expected {w}" for k, _, s, w in head_shape_errors)
        raise JdupError(
            f"num_labels={n_labels} does not match the checkpoint's classification head ({lines}); "
            "pass the checkpoint's num_labels, or remove the head from the checkpoint to re-initialise it",
            source_name,
        )
    hard_missing = [p for p in missing if p not in head_missing]
    # a partially present head is an error, not something to silently re-initialise
    if head_missing and len(head_missing) < sum(_matches_any(p, arch.head_rules) for p in flat):
        present_head = {p for p in flat if _matches_any(p, arch.head_rules)} - set(head_missing)
        head_groups = {p.rsplit(".", 1)[0] for p in present_head}
        hard_missing += [p for p in head_missing if p.rsplit(".", 1)[0] in head_groups]
        head_missing = [p for p in head_missing if p.rsplit(".", 1)[0] not in head_groups]
    if hard_missing or unexpected or bad_shape or duplicate:
        problems = []
        if hard_missing:
            names = []
            for p in hard_missing:
                hf = index.jdup_to_hf(p)
                names.append(f"{hf[1]} (-> {p})" if hf else f"{p} (no key rule)")
            problems.append(f"missing tensors: {', '.join(names)}")
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(unexpected)}")
        if bad_shape:
            problems.append(
                "wrong shapes: "
                + ", ".join(f"{k} (-> {j}) has shape {s}, expected {w}" for k, j, s, w in bad_shape)
            )
        if duplicate:
            problems.append(f"tensors given twice: {', '.join(duplicate)}")
        raise JdupError(
            f"checkpoint does not fit {arch.name} config "
            f"(layers={getattr(cfg, 'num_hidden_layers', '?')}, hidden={getattr(cfg, 'hidden_size', '?')}"
            f"): " + "; ".join(problems),
            source_name,
        )

    std = float(getattr(cfg, "initializer_range", 0.02))
    key = jax.random.key(seed)
    pure = nnx.to_pure_dict(state)
    for jpath, (kpath, leaf) in flat.items():
        target = getattr(leaf, "sharding", None)
        if mesh is not None:
            target = NamedSharding(mesh, sharding.param_spec(jpath, leaf.shape, mesh, fsdp=fsdp))
        if jpath in values and mesh is not None:  # host -> shards, never the whole tensor on one device
            arr = mesh_lib.put_host(np.asarray(values[jpath], dtype=leaf.dtype), target)
        elif jpath in values:
            arr = jnp.asarray(values[jpath], dtype=leaf.dtype)
        else:  # a missing head, initialised as transformers' _init_weights does
            key, sub = jax.random.split(key)
            leaf_name = kpath[-1]
            if leaf_name == "bias":
                arr = jnp.zeros(leaf.shape, leaf.dtype)
            elif leaf_name == "scale":
                arr = jnp.ones(leaf.shape, leaf.dtype)
            else:
                arr = (std * jax.random.normal(sub, leaf.shape, jnp.float32)).astype(leaf.dtype)
        if isinstance(target, NamedSharding) and arr.sharding != target:
            arr = mesh_lib.put_host(np.asarray(arr), target) if mesh is not None else jax.device_put(arr, target)
        _set(pure, kpath, arr)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    report = LoadReport(
        source=source_name,
        arch=arch.name,
        loaded=len(values),
        initialized=tuple(head_missing),
        ignored=tuple(ignored),
        prefixed=prefixed,
    )
    if head_missing:
        log.warning(
            "%s: no classification head in the checkpoint; initialised %s (normal(0, %g), zero bias)",
            source_name,
            ", ".join(head_missing),
            std,
        )
    model.load_report = report
    return model


# ---------------------------------------------------------------------------------------------------------------
# public entry points


def from_checkpoint(
    hf_config: dict,
    tensors: Mapping[str, np.ndarray],
    source: str | os.PathLike,
    num_labels: int | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
    mesh: Mesh | str | None = None,
    fsdp: bool = False,
    **config_overrides,
) -> nnx.Module:
    """Build a classifier from what a reader returned: a Hugging Face config dict and Hugging Face-named tensors.

    Args:
      hf_config: a ``config.json`` dict (its ``model_type`` picks the family).
      tensors: ``{hf_name: array}``; may be lazy. A mapping with its own ``source`` attribute
        (:class:`jdup.models.readers.FolderTensors`) names that file in tensor errors.
      source: the file named in config errors (and in tensor errors otherwise).
      num_labels, dtype, param_dtype, seed, mesh, fsdp, config_overrides: as in :func:`from_pretrained`.

    Raises:
      JdupError: unsupported ``model_type``, a config the family cannot honour, tensors that do not fit.
    """
    arch = arch_for(hf_config, source)
    try:
        cfg = arch.config_from_hf(hf_config, num_labels)
    except JdupError as e:
        raise JdupError(e.problem, source) from e
    if config_overrides:
        cfg = dataclasses.replace(cfg, **config_overrides)
    tensor_source = getattr(tensors, "source", None) or os.fspath(source)
    return load_state_from_tensors(
        arch, cfg, tensors, tensor_source, dtype=dtype, param_dtype=param_dtype, seed=seed, mesh=mesh, fsdp=fsdp
    )


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    num_labels: int | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
    mesh: Mesh | str | None = None,
    fsdp: bool = False,
    **config_overrides,
) -> nnx.Module:
    """Load a Hugging Face sequence classifier (or a bare backbone plus a new head) as an NNX model.

    Args:
      path_or_hub_id: ``builtin:minilm`` / ``builtin:smollm2``, a local folder with ``config.json`` + weights, a
        ``.gguf`` file (Llama / Qwen2), or a Hub id (downloaded with ``huggingface_hub``; needs network).
      num_labels: classes of the head; None keeps the checkpoint's (``id2label``/``num_labels``, default 2).
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
      param_dtype: parameter storage dtype.
      seed: seed of a newly initialised head.
      mesh: load straight into a sharded layout on this mesh (or a spec ``"auto"`` / ``"DxM"`` / ``"1"``, see
        :func:`jdup.mesh.make_mesh`): replicated over ``data``, split over ``model`` by
        :mod:`jdup.models.sharding`. None: the default device.
      fsdp: with ``mesh``, also split parameters along the ``data`` axis (FSDP: for models whose weights and
        optimizer state do not fit one device).
      **config_overrides: fields replaced on the family config after reading ``config.json`` (e.g. ``remat=True``,
        ``hidden_dropout_prob=0.0``).

    Returns:
      The model; ``model.config`` is the family config and ``model.load_report`` says what was initialised.

    Raises:
      JdupError: missing/invalid files, unsupported ``model_type``, tensors that do not fit, label mismatch.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype, seed=seed, mesh=mesh, fsdp=fsdp, **config_overrides)
    if hub.is_gguf(path_or_hub_id):
        return from_gguf(path_or_hub_id, num_labels, **kw)
    folder = hub.resolve_path(path_or_hub_id)
    if not folder.is_dir():
        raise JdupError("expected a model folder", folder)
    hf_cfg, tensors = readers.read_folder(folder)
    return from_checkpoint(hf_cfg, tensors, folder / "config.json", num_labels, **kw)


def from_gguf(
    path: str | os.PathLike = "builtin:smollm2", num_labels: int | None = 2, **kwargs
) -> nnx.Module:
    """:func:`from_pretrained` for a llama.cpp GGUF decoder (Llama / Qwen2): a new ``score`` head,
    ``normal(0, 0.02)``; ``kwargs`` as there (``dtype``, ``param_dtype``, ``seed``, ``mesh``, config fields).

    Returns:
      A :class:`~jdup.models.decoder.DecoderForSequenceClassification` with ``load_report``.
    """
    path = hub.resolve_gguf(path)
    hf_cfg, tensors = gguf.read_gguf(path)
    return from_checkpoint(hf_cfg, tensors, path, num_labels, **kwargs)


def export_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as ``{hf_name: float32 np.ndarray}`` in Hugging Face (torch) layout.

    Raises:
      JdupError: a parameter no key rule covers (e.g. unmerged LoRA adapters).
    """
    from jdup import mesh as mesh_lib  # jdup.mesh imports jdup.models.sharding (this package)

    cfg = model.config
    arch = registry.get(cfg.arch)
    index = _RuleIndex(arch.key_rules(cfg))
    out, uncovered = {}, []
    for jpath, (_, leaf) in _flat_params(nnx.state(model, nnx.Param)).items():
        hit = index.jdup_to_hf(jpath)
        if hit is None:
            uncovered.append(jpath)
            continue
        rule, hf = hit
        # whole on every process, also from a model split over several hosts' devices
        out[hf] = np.ascontiguousarray(rule.transform.to_hf(mesh_lib.gather(jnp.asarray(leaf, jnp.float32))))
    if uncovered:
        raise JdupError(
            f"cannot export parameters with no Hugging Face name (merge LoRA adapters first?): "
            f"{', '.join(uncovered)}"
        )
    return out


def save_pretrained(model: nnx.Module, path: str | os.PathLike, tokenizer_src: Any = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (float32, HF names) and optionally tokenizer files.

    The folder is written under a temporary name and then moved into place, so readers never see half a save;
    an existing folder at ``path`` is replaced.

    Args:
      model: a jdup classifier (any registered family).
      path: destination folder.
      tokenizer_src: a folder / ``builtin:`` name whose tokenizer files are copied, or a tokenizer object with
        ``save_pretrained``; None writes no tokenizer.

    Returns:
      The destination folder.
    """
    from safetensors.numpy import save_file

    dest = Path(path).expanduser().absolute()
    arch = registry.get(model.config.arch)
    hf_cfg = arch.config_to_hf(model.config)
    tensors = export_tensors(model)
    tmp = Path(atomic.temp_dir(dest))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        save_file(tensors, os.fspath(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic.fix_mode(tmp / "model.safetensors")  # safetensors creates it 0600; every other file is 0644
        if tokenizer_src is not None:
            hub.save_tokenizer(tokenizer_src, tmp)
        atomic.replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def gguf_to_hf(path: str | os.PathLike, dest: str | os.PathLike, num_labels: int = 2, seed: int = 0) -> Path:
    """Convert a GGUF decoder to a Hugging Face classifier folder (``config.json``, ``model.safetensors``,
    tokenizer files) that :func:`from_pretrained` and transformers both load, without torch.

    Returns:
      The destination folder.
    """
    path = hub.resolve_gguf(path)
    model = from_gguf(path, num_labels, seed=seed)
    return save_pretrained(model, dest, tokenizer_src=gguf.tokenizer_from_gguf(path))
