"""Sharding rules, and sharded == single-device on 8 simulated CPU devices (run in a subprocess, because the device
count must be fixed before JAX initialises and the rest of the suite runs on one device)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdup import mesh as jdup_mesh
from jdup.models import decoder, sharding


def test_rules_on_one_device_mesh_replicate_everything():
    mesh = jdup_mesh.make_mesh("1")
    assert sharding.param_spec("model.layers.0.self_attn.q_proj.kernel", (32, 32), mesh) == P(None, None)


def test_full_size_llama_fsdp_layout():
    """Llama-3.2-3B (abstract) on a 2x4 mesh of fake devices: big matrices are split 8 ways."""
    import jax

    cfg = decoder.DecoderConfig.preset("llama-3.2-3b")
    abstract = nnx.eval_shape(lambda: decoder.build(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)

    class FakeMesh:  # param_spec only needs axis sizes
        shape = {"data": 2, "model": 4}

    spec = lambda p, s: sharding.param_spec(p, s, FakeMesh())
    assert spec("model.layers.0.self_attn.q_proj.kernel", (3072, 3072)) == P("data", "model")
    assert spec("model.layers.0.self_attn.o_proj.kernel", (3072, 3072)) == P("model", "data")
    assert spec("model.embed_tokens.embedding", (128256, 3072)) == P("model", "data")
    assert spec("model.layers.0.input_layernorm.weight", (3072,)) == P(None)
    assert spec("score.kernel", (3072, 2)) == P("data", None)
    assert spec("model.layers.0.self_attn.q_proj.lora_a", (3072, 32)) == P("data", None)
    assert spec("model.layers.0.self_attn.q_proj.lora_b", (32, 3072)) == P(None, "model")
    assert spec("model.layers.0.self_attn.o_proj.lora_a", (3072, 32)) == P("model", None)
    total = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(state))
    per_dev = sharding.per_device_bytes(state, FakeMesh())
    assert total / 8 <= per_dev < total / 8 * 1.01
    assert sharding.per_device_bytes(state, FakeMesh(), fsdp=False) > total / 4 * 0.99


def test_from_pretrained_onto_a_mesh_spec(tmp_path):
    """``from_pretrained(..., mesh=...)`` places every parameter on the mesh and loads the same values."""
    import jax

    from jdup.models import from_pretrained, save_pretrained, tiny_model

    model = tiny_model("llama", seed=1)
    src = save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(src, mesh="1")
    q = loaded.model.layers[0].self_attn.q_proj.kernel[...]
    assert isinstance(q.sharding, jax.sharding.NamedSharding) and q.sharding.mesh.axis_names == ("data", "model")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_put_rows_rejects_a_batch_the_data_axis_does_not_divide():
    mesh = jdup_mesh.make_mesh("1")
    out = jdup_mesh.put_rows({"ids": np.zeros((3, 4), np.int32)}, mesh)
    assert out["ids"].shape == (3, 4)
    with pytest.raises(ValueError, match="devices"):
        jdup_mesh.make_mesh("2x4")


@pytest.mark.slow
def test_sharded_equals_single_device_on_8_fake_devices():
    # imported here, not at the top: this file is also the subprocess's script
    from tests.helpers.subproc import xla_flags

    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(8)
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(__file__),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "SHARDING-OK" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# the 8-device check (runs as a script in the subprocess above)


def _main() -> None:
    import jax
    import jax.numpy as jnp
    import optax

    from jdup.models import bart

    assert jax.device_count() == 8, jax.devices()
    mesh = jdup_mesh.make_mesh("2x4")
    cfg = decoder.DecoderConfig.tiny(
        "qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=256,
    )
    single = decoder.build(cfg, rngs=nnx.Rngs(0))
    sharded = jdup_mesh.put_model(nnx.clone(single), mesh, fsdp=True)
    q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("data", "model"), q.sharding
    assert q.addressable_shards[0].data.shape == (32, 16)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, 9:] = 0
    y = (np.arange(8) % 2).astype(np.int32)
    batch = jdup_mesh.put_rows({"ids": ids, "mask": mask, "y": y}, mesh)
    assert batch["ids"].sharding.spec == P("data", None)

    fwd = nnx.jit(lambda m, i, k: m(i, k, output_hidden_states=True))
    a = fwd(single, jnp.asarray(ids), jnp.asarray(mask))
    b = fwd(sharded, batch["ids"], batch["mask"])
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-5)
    for sa, sb in zip(a.hidden_states, b.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), atol=1e-5)

    # loading a checkpoint straight into the sharded layout (from_pretrained(..., mesh=...)) gives the same model
    import tempfile

    from jdup.models import from_pretrained, save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        loaded = from_pretrained(save_pretrained(single, os.path.join(tmp, "m")), mesh=mesh, fsdp=True)
    assert loaded.model.layers[0].self_attn.q_proj.kernel[...].sharding.spec == P("data", "model")
    assert loaded.model.embed_tokens.embedding[...].sharding.spec == P("model", "data")
    ol = fwd(loaded, batch["ids"], batch["mask"])
    np.testing.assert_allclose(np.asarray(ol.logits), np.asarray(a.logits), atol=1e-5)

    # a train step (AdamW) on the full model: same losses and same updated parameters
    @nnx.jit
    def step(model, opt, ids, mask, y):
        def loss_fn(m):
            logits = m(ids, mask).logits.astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    # Adam divides by sqrt(v): with the default eps=1e-8 a near-zero gradient turns float-reordering noise into
    # an O(lr) update difference; eps=1e-6 bounds that amplification without changing what is compared
    tx = optax.adamw(1e-2, eps=1e-6)
    opt_a = nnx.Optimizer(single, tx, wrt=nnx.Param)
    opt_b = nnx.Optimizer(sharded, tx, wrt=nnx.Param)
    for _ in range(2):
        la = step(single, opt_a, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(y))
        lb = step(sharded, opt_b, batch["ids"], batch["mask"], batch["y"])
        np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    # tolerance: 1% of one step's size (lr); a wrong gradient or a lost update would differ by ~lr
    for pa, pb in zip(jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded)), strict=True):
        np.testing.assert_allclose(np.asarray(pa), np.asarray(pb), atol=1e-4)
    assert sharded.model.layers[1].mlp.down_proj.kernel[...].sharding.spec == P("model", "data")

    # LoRA on the sharded decoder (q/k/v/o adapters follow their base kernels' layout)
    try:
        from jdup import lora
    except ImportError:
        lora = None
    if lora is not None:
        la_model = lora.add_lora(single, rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(1))
        lb_model = jdup_mesh.put_model(lora.add_lora(nnx.clone(single), rank=4, alpha=8.0, dropout=0.0,
                                                     rngs=nnx.Rngs(1)), mesh, fsdp=True)  # fmt: skip
        assert lb_model.model.layers[0].self_attn.q_proj.lora_b[...].sharding.spec == P(None, "model")

        def lora_grads(model, ids, mask, y):
            gdef, lp, rest = nnx.split(model, nnx.LoRAParam, ...)

            def loss(lp):
                m = nnx.merge(gdef, lp, rest)
                return optax.softmax_cross_entropy_with_integer_labels(m(ids, mask).logits, y).mean()

            return jax.grad(loss)(lp)

        ga = nnx.jit(lora_grads)(la_model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(y))
        gb = nnx.jit(lora_grads)(lb_model, batch["ids"], batch["mask"], batch["y"])
        for x, z in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(z), atol=1e-5)

    # BART: forward with encoder and decoder states
    bcfg = bart.BartConfig.tiny(
        d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=256
    )
    bs = bart.build(bcfg, rngs=nnx.Rngs(0))
    bb = jdup_mesh.put_model(nnx.clone(bs), mesh, fsdp=True)
    bids = ids.copy()
    bids[:, 8] = bcfg.eos_token_id
    bfwd = nnx.jit(lambda m, i, k: m(i, k, output_hidden_states=True))
    oa = bfwd(bs, jnp.asarray(bids), jnp.asarray(mask))
    ob = bfwd(bb, jax.device_put(bids, batch["ids"].sharding), batch["mask"])
    np.testing.assert_allclose(np.asarray(oa.logits), np.asarray(ob.logits), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(oa.encoder_hidden_states[-1]), np.asarray(ob.encoder_hidden_states[-1]), atol=1e-5
    )

    # initialisation straight into the sharded layout gives the same weights as a plain build
    init = sharding.init_sharded(lambda: decoder.build(cfg, rngs=nnx.Rngs(0)), mesh)
    ref = decoder.build(cfg, rngs=nnx.Rngs(0))
    assert init.model.embed_tokens.embedding[...].sharding.spec == P("model", "data")
    for pa, pb in zip(jax.tree.leaves(nnx.state(ref)), jax.tree.leaves(nnx.state(init)), strict=True):
        np.testing.assert_allclose(np.asarray(pa), np.asarray(pb), atol=1e-6)
    print("SHARDING-OK")


if __name__ == "__main__":
    _main()
