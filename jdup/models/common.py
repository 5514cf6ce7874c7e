"""Types shared by every model family.

Contract (every architecture under ``jdup/models`` follows it):

* ``model(input_ids, attention_mask, token_type_ids=None, *, output_hidden_states=False,
  deterministic=True, rngs=None) -> Output``. ``input_ids``/``attention_mask`` are ``[batch, seq]`` int arrays;
  ``attention_mask`` is 1 on real tokens. ``deterministic=False`` turns dropout on and then ``rngs`` (an
  ``nnx.Rngs`` with a ``dropout`` stream) must be given: models hold no RNG state of their own, so their state
  is only parameters (easy to vmap, shard and checkpoint).
* ``model.config`` is the frozen config dataclass of the family; it has at least ``arch`` (registry name),
  ``num_labels``, ``num_hidden_layers``, ``hidden_size``, ``pad_token_id``.
* Every linear layer is an ``nnx.Linear`` (``kernel [in, out]``) so LoRA can find and wrap it by name.
  Attribute names follow Hugging Face (BERT ``query/key/value``; Llama ``q_proj/k_proj/v_proj/o_proj``; BART
  ``q_proj/k_proj/v_proj/out_proj``).
* Class attributes: ``LORA_TARGETS`` (default module names LoRA adapts, as in DUP) and ``HEAD`` (names of the
  top-level submodules that form the classification head, trained fully during unlearning).
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class Output(NamedTuple):
    """What a classifier returns.

    Attributes:
      logits: ``[batch, num_labels]``.
      hidden_states: ``None`` unless requested; else a tuple of ``[batch, seq, dim]`` arrays in Hugging Face
        order (embedding output first, then one per layer; for decoders the last one is after the final norm,
        as in transformers). For BART these are the *decoder* hidden states.
      encoder_hidden_states: BART only (same convention, encoder side); ``None`` for other families.
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    encoder_hidden_states: tuple[jax.Array, ...] | None = None


#: Archs whose classifier forward accepts ``last_layer_positions="cls"``: the last layer computed at position 0
#: only, exact for their [CLS] head and for [CLS] pooling (``jdup.models.encoder``).
CLS_TRIM_ARCHS = ("bert", "roberta")
