"""The public loaders accept every documented builtin name (the GGUF decoder goes through the same API)."""

import numpy as np
import pytest

import jdup.models as jm


@pytest.mark.slow
def test_smollm2_builtin_through_public_api():
    tok = jm.load_tokenizer("builtin:smollm2")
    ids = tok("hello world")["input_ids"]
    assert len(ids) >= 2
    model = jm.from_pretrained("builtin:smollm2", 2)
    assert model.config.arch == "llama" and model.config.num_labels == 2
    enc = tok(["hello world", "a fine film"], padding=True, return_tensors="np")
    out = model(enc["input_ids"], enc["attention_mask"])
    assert out.logits.shape == (2, 2) and np.isfinite(np.asarray(out.logits)).all()
