"""The BERT family: NSP/SOP pairs, n-gram masking, ALBERT's parameter savings, paper sizes,
and the objective-pluggable train step (multi-term losses under gradient accumulation)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spanlm
from spanlm import configs, parallel, summary
from spanlm.objectives import masking, pairs

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXPERIMENTS = os.path.join(ROOT, "experiments")


def single_segment_rows(lengths, seq_len, base=1000):
  """Rows [CLS] t_1..t_k [SEP] [PAD]..., row r's tokens base*r + 10 + i (unique per row)."""
  ids = np.zeros((len(lengths), seq_len), np.int32)
  for r, k in enumerate(lengths):
    if k:
      ids[r, 0], ids[r, 1:1 + k], ids[r, 1 + k] = masking.CLS_ID, base * r + 10 + np.arange(k), masking.SEP_ID
  return ids


def split_pair(ids, seg):
  """(first, second) text segments of one built row, checking the [CLS] A [SEP] B [SEP] layout."""
  assert ids[0] == masking.CLS_ID
  seps = np.flatnonzero(ids == masking.SEP_ID)
  assert len(seps) == 2, ids
  a, b = ids[1:seps[0]], ids[seps[0] + 1:seps[1]]
  assert (ids[seps[1] + 1:] == masking.PAD_ID).all()
  np.testing.assert_array_equal(seg[:seps[0] + 1], 0)
  np.testing.assert_array_equal(seg[seps[0] + 1:seps[1] + 1], 1)
  np.testing.assert_array_equal(seg[seps[1] + 1:], 0)
  return a, b


# --- NSP / SOP pairs ---------------------------------------------------------------------------
L = 48
LENGTHS = np.random.default_rng(0).integers(2, L - 1, size=256)  # some full (k = L-2), all splittable


@pytest.mark.parametrize("task", ["nsp", "sop"])
@pytest.mark.slow
def test_pair_labels_are_balanced_and_segments_contiguous(task):
  ids = single_segment_rows(LENGTHS, L)
  built = jax.device_get(pairs.make_pairs(jax.random.PRNGKey(1), jnp.asarray(ids), task))
  labels = built.labels
  assert built.weights.min() == 1.0
  # 256 fair coins: 50% +- 3.2 standard deviations of 3.1%.
  assert abs(labels.mean() - 0.5) < 0.1
  for r in range(len(ids)):
    k = LENGTHS[r]
    first, second = split_pair(built.input_ids[r], built.segment_ids[r])
    text = 1000 * r + 10 + np.arange(k)
    n = min(k, L - 3)  # budget: three special tokens
    assert 1 <= len(first) and 1 <= len(second) and len(first) + len(second) <= n
    assert (built.input_ids[r] != masking.PAD_ID).sum() <= L
    if task == "sop":
      if labels[r]:  # swapped: B A, together the first n tokens of the row
        first, second = second, first
      np.testing.assert_array_equal(np.concatenate([first, second]), text[:n])
      assert len(first) == built.split[r]
    else:
      np.testing.assert_array_equal(first, text[:len(first)])
      if labels[r] == 0:  # IsNext: the actual continuation
        np.testing.assert_array_equal(second, text[len(first):n])
      else:  # NotNext: a contiguous stretch of another row
        other = second[0] // 1000
        assert other != r
        start = second[0] - 1000 * other - 10
        np.testing.assert_array_equal(second, 1000 * other + 10 + start + np.arange(len(second)))
        assert start + len(second) <= LENGTHS[other]


@pytest.mark.slow
def test_rows_without_a_next_segment_fall_back_to_single_segments():
  ids = single_segment_rows([1, 0, 30, 1], 40)
  built = jax.device_get(pairs.make_pairs(jax.random.PRNGKey(0), jnp.asarray(ids), "nsp"))
  np.testing.assert_array_equal(built.weights, [0, 0, 1, 0])
  np.testing.assert_array_equal(built.input_ids[0, :4], [masking.CLS_ID, 10, masking.SEP_ID, 0])
  assert (built.segment_ids[[0, 1, 3]] == 0).all()
  first, second = split_pair(built.input_ids[2], built.segment_ids[2])
  assert len(first) + len(second) <= 30


# --- n-gram masking ----------------------------------------------------------------------------
@pytest.mark.slow
def test_ngram_lengths_follow_one_over_n_and_fill_the_budget():
  rng = np.random.default_rng(0)
  B, L2, V = 32, 512, 1000
  ids = rng.integers(5, V, size=(B, L2)).astype(np.int32)
  ids[:, 0], ids[:, -1] = masking.CLS_ID, masking.SEP_ID
  table = np.zeros(V, bool)
  table[5:] = rng.random(V - 5) < 0.7  # ~1.4 tokens per word
  starts = np.asarray(masking.word_starts(jnp.asarray(ids), jnp.asarray(table)))
  words = []
  # 4 draws (~4,000 n-grams): one draw's share of 1-grams varies by ±0.015 around its mean of 0.58.
  for key in range(4):
    m = jax.device_get(masking.mask_ngrams(jax.random.PRNGKey(key), jnp.asarray(ids), jnp.asarray(table),
                                           vocab_size=V, rate=0.15, max_ngram=3))
    for r in range(B):
      for u in np.unique(m.span_id[r][m.span_id[r] >= 0]):
        where = m.span_id[r] == u
        assert starts[r][np.flatnonzero(where)[0]]  # n-grams begin at word starts
        words.append(int((where & starts[r]).sum()))
      assert m.weights[r].sum() == round(0.15 * L2)  # budget (ALBERT: len(tokens) with [CLS]/[SEP]) filled
  counts = np.bincount(words, minlength=4)[1:]
  assert counts.sum() == len(words) and max(words) <= 3
  p = counts / counts.sum()
  # Overlap rejection and budget truncation shorten a few n-grams: allow 4 points.
  np.testing.assert_allclose(p, np.array([6, 3, 2]) / 11, atol=0.04)
  np.testing.assert_allclose(masking.ngram_length_probs(3), np.array([6, 3, 2]) / 11)


# --- ALBERT parameters and the papers' sizes ------------------------------------------------------
def sized(size, vocab, objective="mlm", **model):
  c = configs.base_config()
  c.model.size, c.model.vocab_multiple, c.objective.name = size, 1, objective
  for k, v in model.items():
    c.model[k] = v
  return summary.summarize(c, vocab)


@pytest.mark.parametrize("size,vocab,model,objective,expected,tol", [
    ("base", 30522, {}, "mlm_nsp", 110e6, 0.01),  # Devlin et al. 2019: BERT-base 110M
    ("large", 30522, {}, "mlm_nsp", 340e6, 0.02),  # BERT-large 340M (335.1M exactly)
    ("base", 30000, dict(embedding_size=128, share_layers="all"), "mlm_sop", 12e6, 0.03),  # ALBERT Table 1
    ("large", 30000, dict(embedding_size=128, share_layers="all"), "mlm_sop", 18e6, 0.02),
    # ELECTRA-small (Clark et al. 2020, Table 6): E 128, H 256, 12 layers, 4 heads, FFN 1024; 14M.
    ("base", 30522, dict(embedding_size=128, hidden_size=256, num_heads=4, intermediate_size=1024),
     "mlm", 14e6, 0.04),
])
def test_parameter_counts_match_the_papers(size, vocab, model, objective, expected, tol):
  p = sized(size, vocab, objective, **model)["parameters"]
  assert p["encoder"] == pytest.approx(expected, rel=tol)
  assert p["encoder"] == p["embedding"] + p["non_embedding"]
  assert p["total"] == p["encoder"] + p["heads"]


def test_all_shared_parameters_do_not_grow_with_depth_and_partial_sharing_grows_by_the_rest():
  H, I = 768, 3072
  count = lambda n, share: sized("base", 30000, num_layers=n, share_layers=share,
                                 embedding_size=128)["parameters"]["encoder"]
  assert count(2, "all") == count(12, "all")
  attention, ffn, norms = 4 * H * H + 4 * H, 2 * H * I + I + H, 4 * H
  assert count(12, "attention") - count(2, "attention") == 10 * (ffn + norms)
  assert count(12, "ffn") - count(2, "ffn") == 10 * (attention + norms)
  assert count(12, "none") - count(2, "none") == 10 * (attention + ffn + norms)


def test_factorized_embeddings_cost_ve_plus_eh():
  V, E, H, P = 30000, 128, 768, 512
  _, params = summary.abstract_params(_albert_config(), V)
  emb = params["encoder"]["embeddings"]
  assert emb["word_embeddings"].shape == (V, E)
  assert emb["projection"]["kernel"].shape == (E, H)
  expected = (V + P + 2) * E + 2 * E + E * H + H  # tables, LayerNorm(E), projection
  assert sized("base", V, embedding_size=E)["parameters"]["embedding"] == expected
  # The MLM head decodes through the E-wide table: its transform maps H -> E.
  assert params["mlm_transform"]["dense"]["kernel"].shape == (H, E)


def _albert_config():
  c = configs.base_config()
  c.model.vocab_multiple, c.model.embedding_size, c.model.share_layers = 1, 128, "all"
  return c


def test_training_flops_are_three_forward_passes_of_the_applied_weights():
  out = sized("base", 30522)
  n_layer_kernels = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
  f = out["flops"]
  assert f["encoder_matmul_forward"] == 2 * n_layer_kernels
  assert f["attention_forward"] == 12 * 4 * 128 * 768  # QK^T and AV at L = 128
  assert f["train"] == pytest.approx(3 * f["forward"])
  # Agrees with the benchmarks' MFU formula (spanlm/flops.py) where both apply (E = H).
  from spanlm import flops
  from spanlm.models.bert import config_for
  assert f["train"] * 128 == pytest.approx(
      flops.bert_train_flops_per_sequence(config_for("base", vocab_size=30522), 128), rel=1e-9)
  # All-shared ALBERT applies its one layer 12 times: same compute as unshared, plus E->H.
  shared = sized("base", 30522, share_layers="all", embedding_size=128)["flops"]
  assert shared["encoder_matmul_forward"] == 2 * (n_layer_kernels + 128 * 768)


@pytest.mark.slow
def test_model_summary_tool_prints_json():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "model_summary.py"),
                        f"--config={os.path.join(EXPERIMENTS, 'albert.py')}", "--vocab_size=30000"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  import json
  report = json.loads(out.stdout[:out.stdout.rindex("}") + 1])
  assert report["parameters"]["encoder"] == pytest.approx(12e6, rel=0.03)
  assert report["flops"]["train"] > 0 and report["layers"]


# --- the pluggable train step ------------------------------------------------------------------
V2, L3, B = 500, 24, 8


def pair_config(objective, accum=1):
  c = spanlm.load_config(os.path.join(EXPERIMENTS, "albert.py:tiny"))
  c.objective.name = objective
  c.train.batch_size, c.train.seq_len, c.train.grad_accum_steps = B, L3, accum
  c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 1, 64, 128
  c.model.embedding_size, c.model.vocab_multiple = 32, 1
  c.optimizer.name, c.optimizer.learning_rate, c.schedule.warmup_steps = "adamw", 3e-3, 0
  c.optimizer.bias_correction = True  # without warmup, Adam needs its bias correction (ALBERT's LAMB has none)
  for k in ("data", "fsdp", "model"):
    c.mesh[k] = 1
  return c


def make_batch(seed):
  lengths = np.random.default_rng(seed).integers(4, L3 - 2, size=B)
  ids = single_segment_rows(lengths, L3, base=0)
  ids[ids >= 10] = np.random.default_rng(seed).integers(5, V2, size=int((ids >= 10).sum()))
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def sop_trainers():
  mesh = parallel.make_mesh(pair_config("mlm_sop").mesh, jax.devices()[:1])
  table = np.ones(V2, bool)
  return (spanlm.Trainer(pair_config("mlm_sop"), V2, table, mesh),
          spanlm.Trainer(pair_config("mlm_sop", accum=4), V2, table, mesh))


@pytest.mark.slow
def test_two_term_loss_under_accumulation_equals_the_large_batch(sop_trainers):
  """MLM (per token) + SOP (per row): each term keeps its own global denominator."""
  single, accum = sop_trainers
  states, metrics = [], []
  for t in (single, accum):
    state = t.init_state()
    for i in range(2):
      state, m = t.train_step(state, parallel.global_batch(make_batch(i), t.mesh))
    states.append(state)
    metrics.append(jax.device_get(m))
  for k in ("loss", "mlm_loss", "pair_loss", "pair_label_rate"):
    assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-5), k
  assert metrics[0]["loss"] == pytest.approx(metrics[0]["mlm_loss"] + metrics[0]["pair_loss"], rel=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(states[0].params)),
                  jax.tree.leaves(jax.device_get(states[1].params))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_pair_objective_learns_and_evaluates(sop_trainers):
  single, _ = sop_trainers
  state = single.init_state()
  batch = parallel.global_batch(make_batch(5), single.mesh)
  first = last = None
  for i in range(20):
    state, m = single.train_step(state, batch)
    first = first or float(m["loss"])
    last = float(m["loss"])
  assert np.isfinite(last) and last < first - 0.5
  ev = single.evaluate(state.params, [make_batch(6), make_batch(7)])
  assert 0.0 <= ev["eval/pair_accuracy"] <= 1.0 and np.isfinite(ev["eval/pair_loss"])
  assert ev["eval/num_predictions"] > 0


def test_unknown_objective_is_a_config_error():
  c = pair_config("mlm_nsp")
  c.objective.name = "xlnet"
  with pytest.raises(ValueError, match="config.objective.name='xlnet'"):
    configs.validate(c)
