"""Hugging Face interop: loading, exporting, round trips with transformers (PyTorch), and bad checkpoints."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

import jdup.models as jm
from jdup.errors import JdupError
from jdup.models import hf, registry
from tests.helpers.encoder_ref import (
    assert_close_outputs,
    jdup_forward,
    padded_batch,
    torch_forward,
    torch_model,
)


def _params(model):
    return {k: np.asarray(v) for k, (_, v) in hf._flat_params(nnx.state(model, nnx.Param)).items()}


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_jdup_save_loads_in_transformers_with_same_logits(arch, tmp_path, minilm_dir):
    from transformers import AutoModelForSequenceClassification

    model = jm.tiny_model(arch, num_labels=3, seed=7, vocab_size=100, max_position_embeddings=66)
    dest = jm.save_pretrained(
        model, tmp_path / "out", tokenizer_src="builtin:minilm" if arch == "bert" else None
    )
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["num_labels"] == 3
    assert cfg["architectures"] == [
        "BertForSequenceClassification" if arch == "bert" else "RobertaForSequenceClassification"
    ]
    assert cfg["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert not list(tmp_path.glob("out.tmp-*"))
    tm = AutoModelForSequenceClassification.from_pretrained(dest).eval()
    ids, mask, types = padded_batch(arch)
    types = types if arch == "bert" else None
    assert_close_outputs(torch_forward(tm, ids, mask, types), jdup_forward(model, ids, mask, types))
    # and back into jdup, bit for bit
    again = jm.from_pretrained(dest)
    assert again.config == model.config
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    if arch == "bert":
        assert (dest / "tokenizer.json").is_file() and (dest / "vocab.txt").is_file()
        assert jm.load_tokenizer(dest)("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_torch_finetuned_checkpoint_loads_with_same_logits(tmp_path):
    import torch

    tm = torch_model("bert", num_labels=2, seed=1).train()
    ids, mask, types = padded_batch("bert", seed=1)
    labels = torch.tensor([0, 1, 1])
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-2)
    for _ in range(3):
        loss = tm(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
            labels=labels,
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tm.eval()
    tm.config.id2label = {0: "negative", 1: "positive"}
    tm.config.label2id = {"negative": 0, "positive": 1}
    tm.save_pretrained(tmp_path)
    model = jm.from_pretrained(tmp_path)
    assert model.config.id2label == ("negative", "positive")
    assert_close_outputs(jdup_forward(model, ids, mask, types), torch_forward(tm, ids, mask, types))


def test_pytorch_bin_and_sharded_safetensors(tmp_path):
    import torch

    tm = torch_model("roberta", num_labels=2, seed=2)
    ids, mask, _ = padded_batch("roberta")
    want = torch_forward(tm, ids, mask)
    tm.save_pretrained(
        tmp_path / "bin"
    )  # transformers 5 writes only safetensors: make the legacy file by hand
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(tm.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for sub in ("bin", "sharded"):
        assert_close_outputs(jdup_forward(jm.from_pretrained(tmp_path / sub), ids, mask), want)


def test_builtin_minilm_new_head_is_reported(minilm_dir, caplog):
    with caplog.at_level("WARNING", logger="jdup.models.hf"):
        model = jm.from_pretrained("builtin:minilm", 4, seed=5)
    rep = model.load_report
    assert set(rep.initialized) == {"classifier.kernel", "classifier.bias"}
    assert rep.prefixed and "embeddings.position_ids" in rep.ignored and rep.loaded == 103
    assert "classification head" in caplog.text
    kernel = np.asarray(model.classifier.kernel[...])
    assert kernel.shape == (384, 4) and 0.01 < kernel.std() < 0.03
    assert np.all(np.asarray(model.classifier.bias[...]) == 0)
    # the report is static metadata: jit works and sees it
    out = nnx.jit(lambda m, x: m(x, x > 0).logits)(model, np.array([[101, 7592, 102, 0]]))
    assert out.shape == (1, 4)


def test_resolve_builtin_and_tokenizer(minilm_dir):
    assert jm.resolve_builtin("builtin:minilm") == minilm_dir
    assert jm.resolve_builtin("minilm") == minilm_dir
    with pytest.raises(JdupError, match="unknown builtin"):
        jm.resolve_builtin("builtin:nope")
    tok = jm.load_tokenizer("builtin:minilm")
    assert tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_wordpiece_tokenizer_fast_path_matches_autotokenizer(minilm_dir, tmp_path):
    """BERT-family folders load through tokenizer.json alone (no AutoTokenizer, so no torch import through
    transformers' config module): the same ids, types, truncation and pad id, and an export names BertTokenizer."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from jdup import data as D
    from jdup.models import hub

    tok, ref = jm.load_tokenizer(minilm_dir), AutoTokenizer.from_pretrained(str(minilm_dir))
    assert getattr(tok, "jdup_tokenizer_class", None) == "BertTokenizer"
    texts = ["Héllo WORLD, ça va?", "東京 naïve café " * 80, "", "  spaced   out  ", "cf mn bb tq [SEP] x"]
    ds = D.TextDataset(np.array(texts, object), np.zeros(len(texts), np.int64), np.zeros(len(texts), np.int8))
    a, b = D.encode(tok, ds, 64), D.encode(ref, ds, 64)
    for k in ("input_ids", "attention_mask", "token_type_ids", "lengths"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert a.pad_id == b.pad_id and a.num_truncated == b.num_truncated == 1
    assert tok.model_max_length == ref.model_max_length
    pair_a, pair_b = tok("first part", "second part"), ref("first part", "second part")
    assert dict(pair_a) == dict(pair_b) and 1 in pair_a["token_type_ids"]  # sentence pairs keep their segment ids
    hub.save_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    assert type(AutoTokenizer.from_pretrained(str(tmp_path))).__name__ == type(ref).__name__
    # jdup's batching (encode) and export need neither transformers nor torch: neither is imported
    code = ("import sys, numpy as np; from jdup import models, data as D; tok = models.load_tokenizer('builtin:minilm'); "
            "D.encode(tok, D.TextDataset(np.array(['a fine film'], object), np.zeros(1, np.int64), np.zeros(1, np.int8)),"
            " 16); models.hub.save_tokenizer(tok, __import__('pathlib').Path(sys.argv[1])); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    saved = tmp_path / "saved"
    saved.mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    assert (saved / "tokenizer.json").read_bytes() == (minilm_dir / "tokenizer.json").read_bytes()


def test_load_state_from_tensors_is_reader_agnostic():
    model = jm.tiny_model("bert", num_labels=2, seed=4)
    tensors = hf.export_tensors(model)
    assert "bert.encoder.layer.1.attention.self.query.weight" in tensors
    assert tensors["classifier.weight"].shape == (2, 32)  # torch (out, in) layout
    # legacy names (bert-base-uncased's LayerNorm.gamma/beta) are accepted, as transformers does
    tensors["bert.embeddings.LayerNorm.gamma"] = tensors.pop("bert.embeddings.LayerNorm.weight")
    tensors["bert.embeddings.LayerNorm.beta"] = tensors.pop("bert.embeddings.LayerNorm.bias")
    again = jm.load_state_from_tensors("bert", model.config, tensors, "in-memory")
    a, b = _params(model), _params(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert registry.get("bert").hf_prefixes == ("bert.",) and "roberta" in registry.names()


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_missing_config_json(tmp_path):
    with pytest.raises(JdupError, match="config.json") as e:
        jm.from_pretrained(tmp_path)
    assert e.value.path.endswith("config.json")
    with pytest.raises(JdupError, match="does not exist"):
        jm.from_pretrained(tmp_path / "nowhere" / "x")


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(JdupError, match=r"model_type 't5' is not supported; supported: .*bert.*roberta") as e:
        jm.from_pretrained(tmp_path)
    assert e.value.path.endswith("config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(JdupError, match="not valid JSON"):
        jm.from_pretrained(tmp_path)


@pytest.fixture()
def tiny_saved(tmp_path):
    model = jm.tiny_model("bert", num_labels=2, seed=0, vocab_size=100, max_position_embeddings=64)
    return jm.save_pretrained(model, tmp_path / "m")


def test_truncated_safetensors_names_file(tiny_saved):
    f = tiny_saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(JdupError, match="truncated") as e:
        jm.from_pretrained(tiny_saved)
    assert e.value.path == str(f)
    (tiny_saved / "model.safetensors").unlink()
    with pytest.raises(JdupError, match="no weights found"):
        jm.from_pretrained(tiny_saved)


def test_missing_unexpected_and_misshaped_reported_together(tiny_saved):
    from safetensors.numpy import load_file, save_file

    f = tiny_saved / "model.safetensors"
    t = load_file(f)
    del t["bert.encoder.layer.1.attention.self.key.bias"]
    t["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros((4, 4), np.float32)
    t["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(JdupError) as e:
        jm.from_pretrained(tiny_saved)
    msg = str(e.value)
    assert "missing tensors: bert.encoder.layer.1.attention.self.key.bias" in msg
    assert "unexpected tensors: bert.encoder.layer.0.attention.self.rotary.weight" in msg
    assert "wrong shapes: bert.encoder.layer.0.intermediate.dense.weight" in msg
    assert "has shape (65, 32), expected (64, 32)" in msg and msg.count("intermediate.dense.weight") == 1
    assert e.value.path == str(f)


def test_num_labels_mismatch_with_checkpoint_head(tiny_saved):
    with pytest.raises(JdupError, match="num_labels=5 does not match"):
        jm.from_pretrained(tiny_saved, num_labels=5)
    assert jm.from_pretrained(tiny_saved, num_labels=2).config.num_labels == 2


def test_export_rejects_unmapped_parameters(tmp_path):
    model = jm.tiny_model("bert")
    model.encoder.layers[0].attention.extra = nnx.Param(jax.numpy.zeros(3))
    with pytest.raises(JdupError, match="extra"):
        jm.save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
