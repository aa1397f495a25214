"""The fine-tuning loop: resume after Ctrl-C equals an uninterrupted run, reruns never destroy work,
a changed config is refused, gradient accumulation equals the large batch, length buckets equal
full padding, group_by_length's order (a rearrangement of the epoch, shorter buckets, resumable),
layer-wise LR decay and BERT's Adam against hand computations."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm import finetune, parallel
from spanlm.data.wordpiece import WordPieceTokenizer
from spanlm.optim import make_optimizer
from spanlm.tasks import get_task

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "was", "very", "a",
         "plot", "acting", "fine", "##s"]


def _write_sst(path, n, rng, labelled=True):
  lines = ["sentence\tlabel" if labelled else "index\tsentence"]
  filler = ["the", "movie", "was", "very", "a", "plot", "acting", "fine", "plots"]
  for i in range(n):
    y = int(rng.integers(2))
    words = list(rng.choice(filler, size=int(rng.integers(2, 12)))) + ["good" if y else "bad"]
    rng.shuffle(words)
    lines.append(f"{' '.join(words)}\t{y}" if labelled else f"{i}\t{' '.join(words)}")
  path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
  root = tmp_path_factory.mktemp("ft")
  data = root / "SST-2"
  data.mkdir()
  rng = np.random.default_rng(0)
  _write_sst(data / "train.tsv", 96, rng)
  _write_sst(data / "dev.tsv", 32, rng)
  _write_sst(data / "test.tsv", 10, rng, labelled=False)
  (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  return root


def _config(root):
  c = finetune.finetune_config()
  c.task.name, c.task.data_dir = "sst2", str(root / "SST-2")
  c.data.tokenizer = str(root / "vocab.txt")
  c.model.size = "tiny"
  c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = 1, 32, 2, 64
  c.model.dropout_rate = 0.1  # dropout on: a resumed run must replay the same keys
  c.train.seq_len, c.train.batch_size, c.train.log_every = 16, 16, 2
  c.finetune.num_epochs, c.finetune.eval_batch_size = 2, 16
  c.optimizer.learning_rate = 3e-3
  return c


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _snapshot(workdir):
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      p = os.path.join(dirpath, name)
      out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


@pytest.fixture(scope="module")
def full_run(sst):
  workdir = str(sst / "full")
  return finetune.run(_config(sst), workdir), workdir


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_rerun_equals_an_uninterrupted_run(sst, full_run, monkeypatch):
  from spanlm import convert

  full, full_dir = full_run
  workdir = str(sst / "interrupted")
  write = finetune.MetricsWriter.write

  def write_then_interrupt(self, step, values):
    write(self, step, values)
    if step == 4 and "train/loss" in values:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of epoch 1

  monkeypatch.setattr(finetune.MetricsWriter, "write", write_then_interrupt)
  first = finetune.run(_config(sst), workdir)
  assert first["preempted"] and first["step"] == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  monkeypatch.setattr(finetune.MetricsWriter, "write", write)
  second = finetune.run(_config(sst), workdir)
  assert second["complete"] and second["steps"] == full["steps"] == 12
  assert second["best/accuracy"] == full["best/accuracy"] and second["best_step"] == full["best_step"]
  _, a, _ = convert.load_converted(os.path.join(full_dir, "model"))
  _, b, _ = convert.load_converted(os.path.join(workdir, "model"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  rows, ref = _rows(workdir), _rows(full_dir)
  assert [r["step"] for r in rows] == [r["step"] for r in ref]  # no duplicate rows
  np.testing.assert_array_equal([r.get("train/loss", 0) for r in rows], [r.get("train/loss", 0) for r in ref])


@pytest.mark.slow
def test_rerunning_a_complete_run_changes_nothing(sst, full_run):
  full, workdir = full_run
  before = _snapshot(workdir)
  again = finetune.run(_config(sst), workdir)
  assert again["complete"] and again["best/accuracy"] == full["best/accuracy"]
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_a_changed_config_is_refused_before_anything_is_written(sst, full_run):
  _, workdir = full_run
  before = _snapshot(workdir)
  c = _config(sst)
  c.optimizer.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"different config \(optimizer.learning_rate: 0.003 -> 0.001\)"):
    finetune.run(c, workdir)
  assert _snapshot(workdir) == before


def test_a_workdir_that_is_a_file_is_a_clear_error(sst, tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    finetune.run(_config(sst), str(path))


# --- the compiled step ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuners(sst):
  from spanlm.models.bert import BertConfig

  def make(accum, buckets=1):
    c = _config(sst)
    c.model.dropout_rate = 0.0
    c.train.grad_accum_steps = accum
    c.finetune.length_buckets = buckets
    c.train.seq_len, c.train.batch_size = 64, 32
    task = get_task("sst2", c)
    feats = task.load("train", WordPieceTokenizer(VOCAB), 64)
    enc = BertConfig(vocab_size=len(VOCAB), num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                     max_position_embeddings=64, dropout_rate=0.0)
    return finetune.Finetuner(c, task, enc, feats.arrays, num_steps=10), feats

  return make


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch(tuners):
  big, feats = tuners(1)
  acc, _ = tuners(4)
  batch = finetune._rows(feats.arrays, np.arange(29), 32)  # 3 padding rows: counts differ per micro-batch
  s1, m1 = big.train_step(big.init_state(0), parallel.global_batch(batch, big.mesh))
  s4, m4 = acc.train_step(acc.init_state(0), parallel.global_batch(batch, acc.mesh))
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), s4.params, s1.params)
  # ... and it really ran 4 micro-batches of 8 rows (a scan of length 4 over [8, L] inputs).
  jaxpr = jax.make_jaxpr(acc._train_step)(acc.init_state(0), batch)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert scans and scans[0].params["length"] == 4
  assert any(v.aval.shape == (4, 8, 64) for v in scans[0].invars)


@pytest.mark.slow
def test_length_buckets_give_the_same_outputs_and_steps(tuners):
  full, feats = tuners(1, buckets=1)
  bucketed, _ = tuners(1, buckets=3)
  assert bucketed.buckets == [16, 32, 64] and full.buckets == [64]
  state = full.init_state(0)
  np.testing.assert_allclose(bucketed.outputs(state.params, feats)["logits"],
                             full.outputs(state.params, feats)["logits"], rtol=1e-5, atol=1e-6)
  short = np.flatnonzero(feats.arrays["attention_mask"].sum(1) <= 16)[:32]
  batch = finetune._rows(feats.arrays, short, 32)
  assert bucketed.fit(batch)["input_ids"].shape == (32, 16)  # rows of at most 16 tokens: bucket 16
  _, m1 = full.train_step(full.init_state(0), parallel.global_batch(batch, full.mesh))
  _, m2 = bucketed.train_step(bucketed.init_state(0), parallel.global_batch(bucketed.fit(batch), full.mesh))
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)


# --- group_by_length -------------------------------------------------------------------------------
def test_grouped_order_rearranges_the_plain_epoch_deterministically():
  lengths = np.random.default_rng(0).integers(5, 65, 1000)  # 31 batches of 32, 8 rows left over
  b, used = 32, 992
  grouped, plain = finetune._grouped_order(3, 0, lengths, b), finetune._order(3, 0, 1000, b)
  np.testing.assert_array_equal(np.sort(grouped[:used]), np.sort(plain[:used]))  # the epoch's rows, once each
  np.testing.assert_array_equal(grouped[used:], plain[used:])  # the same rows left over
  np.testing.assert_array_equal(finetune._grouped_order(3, 0, lengths, b), grouped)  # (seed, epoch) decide
  assert not np.array_equal(finetune._grouped_order(3, 1, lengths, b), grouped)
  assert not np.array_equal(finetune._grouped_order(4, 0, lengths, b), grouped)
  longest = [int(lengths[grouped[i:i + b]].max()) for i in range(0, used, b)]
  assert longest[0] == lengths.max()  # the longest batch first: an out-of-memory shows at step 1
  assert longest[1:] != sorted(longest[1:]) and longest[1:] != sorted(longest[1:], reverse=True)  # shuffled
  spread = [int(np.ptp(lengths[grouped[i:i + b]])) for i in range(0, used, b)]
  assert max(spread) <= 8  # 31 batches in one run of 50 sorted by length: neighbours in length share a batch


def test_grouped_batches_fit_shorter_buckets():
  lengths = np.random.default_rng(0).integers(5, 65, 3200)  # 100 batches of 32, lengths 5..64
  b, buckets = 32, finetune.bucket_lengths(64, 4)
  assert buckets == [16, 32, 64]

  def padded(order):  # each batch's bucket, computed here rather than by finetune
    return [min(x for x in buckets if x >= lengths[order[i:i + b]].max()) for i in range(0, 3200, b)]

  plain, grouped = padded(finetune._order(0, 0, 3200, b)), padded(finetune._grouped_order(0, 0, lengths, b))
  assert np.mean(plain) == 64.0  # 32 random rows nearly always hold one longer than 32 tokens
  assert np.mean(grouped) == 47.04  # 18 batches at 16, 26 at 32, 56 at 64
  assert [grouped.count(x) for x in buckets] == [18, 26, 56]
  assert finetune._bucket_shares(buckets, finetune._grouped_order(0, 0, lengths, b), lengths, b, 100) == \
      {16: 0.18, 32: 0.26, 64: 0.56}


def test_group_by_length_is_refused_where_it_cannot_help(sst):
  c = finetune.finetune_config("squad")
  c.finetune.group_by_length = True
  with pytest.raises(ValueError, match="task 'squad' has no length_keys .*set group_by_length=False"):
    finetune.validate(c)
  c = _config(sst)
  c.finetune.group_by_length, c.finetune.length_buckets = True, 1
  with pytest.raises(ValueError, match="needs length_buckets > 1"):
    finetune.validate(c)
  old = json.loads(finetune.finetune_config().to_json_best_effort())
  del old["finetune"]["group_by_length"]  # a config.json written before the field existed still resumes
  assert finetune.config_changes(old, json.loads(finetune.finetune_config().to_json_best_effort())) == []


@pytest.mark.slow
def test_a_resumed_grouped_run_continues_with_the_same_batches(sst, monkeypatch):
  c = _config(sst)
  c.finetune.group_by_length, c.train.seq_len = True, 32  # buckets [16, 32]; rows of 5..26 tokens
  c.task.eval_split = c.task.predict_split = ""  # training only: seconds
  seen, init, lines, info = [], finetune.Finetuner.__init__, [], finetune.logging.info

  def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    step = self.train_step
    self.train_step = lambda state, batch: (seen.append(np.asarray(batch["input_ids"])), step(state, batch))[1]

  monkeypatch.setattr(finetune.Finetuner, "__init__", recording_init)
  monkeypatch.setattr(finetune.logging, "info", lambda msg, *a, **k: (lines.append(str(msg) % a if a else str(msg)),
                                                                     info(msg, *a, **k)))
  workdir = str(sst / "grouped")
  c.train.stop_at_step = 4
  assert finetune.run(c, workdir)["stopped_at_step"]
  c.train.stop_at_step = 0
  assert finetune.run(c, workdir)["complete"]
  assert sum(x.startswith("group_by_length: training batches per bucket 16: ") for x in lines) == 2
  feats = get_task("sst2", c).load("train", WordPieceTokenizer(VOCAB), 32)
  lengths = finetune.row_lengths(feats.arrays)
  want = []
  for epoch in range(2):  # 96 rows, 6 batches of 16 per epoch
    order = finetune._grouped_order(c.seed, epoch, lengths, 16)
    want += [order[i:i + 16] for i in range(0, 96, 16)]
  assert len(seen) == 12
  for got, rows in zip(seen, want):  # each batch: the grouped order's rows, cut to their bucket
    assert got.shape[1] == (16 if lengths[rows].max() <= 16 else 32)
    np.testing.assert_array_equal(got, feats.arrays["input_ids"][rows][:, :got.shape[1]])
  assert {g.shape[1] for g in seen} == {16, 32}  # grouping put some batches in the short bucket


# --- optimizers ------------------------------------------------------------------------------------
def _opt_config(**kw):
  c = finetune.finetune_config()
  c.optimizer.update(kw)
  c.optimizer.grad_clip = 0.0
  c.schedule.name, c.schedule.warmup_steps = "constant", 0
  return c


PARAMS = {"encoder": {"embeddings": {"word_embeddings": jnp.ones((3, 2))},
                      "layer_0": {"attention": {"query": {"kernel": jnp.ones((2, 2))}}},
                      "layer_1": {"output": {"bias": jnp.ones((2,))}},
                      "pooler": {"kernel": jnp.ones((2, 2))}},
          "classifier": {"kernel": jnp.ones((2, 2))}}


def test_layer_decay_rates_by_hand():
  # ELECTRA: lr * d^(L + 2 - depth); depth 0 embeddings, i+1 layer i, L+1 pooler, L+2 head.
  tx, _ = make_optimizer(_opt_config(name="sgd", momentum=0.0, learning_rate=0.1, layer_decay=0.5), 10,
                         num_layers=2)
  grads = jax.tree.map(lambda p: 2.0 * p, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  want = {"embeddings": 0.5 ** 4, "layer_0": 0.5 ** 3, "layer_1": 0.5 ** 2, "pooler": 0.5}
  for name, factor in want.items():
    leaf = jax.tree.leaves(updates["encoder"][name])[0]
    np.testing.assert_allclose(leaf, -0.1 * factor * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["classifier"]["kernel"], -0.1 * 2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="layer_decay"):
    make_optimizer(_opt_config(layer_decay=0.5), 10)  # needs the number of layers


def test_layer_decay_on_scanned_layers_matches_unrolled():
  # scan_layers stacks layer_0..layer_{L-1} into encoder/layers [L, ...]: each slice keeps its layer's rate.
  scanned = {"encoder": {"embeddings": PARAMS["encoder"]["embeddings"],
                         "layers": {"output": {"bias": jnp.ones((2, 3))}},
                         "pooler": PARAMS["encoder"]["pooler"]},
             "classifier": PARAMS["classifier"]}
  tx, _ = make_optimizer(_opt_config(name="sgd", momentum=0.0, learning_rate=0.1, layer_decay=0.5), 10,
                         num_layers=2)
  updates, _ = tx.update(jax.tree.map(lambda p: 2.0 * p, scanned), tx.init(scanned), scanned)
  want = np.array([0.5 ** 3, 0.5 ** 2])[:, None] * -0.1 * 2.0 * np.ones((2, 3))
  np.testing.assert_allclose(updates["encoder"]["layers"]["output"]["bias"], want, rtol=1e-6)
  np.testing.assert_allclose(updates["encoder"]["embeddings"]["word_embeddings"], -0.1 * 2.0 * 0.5 ** 4, rtol=1e-6)


def test_adam_without_bias_correction_is_berts():
  b1, b2, eps, lr = 0.9, 0.999, 1e-6, 0.01
  tx, _ = make_optimizer(_opt_config(name="adam", learning_rate=lr, bias_correction=False, eps=eps), 10)
  p = {"w": jnp.array([1.0, -2.0, 3.0])}
  state, m, v = tx.init(p), np.zeros(3), np.zeros(3)
  for t in range(3):
    g = np.array([0.5, -1.0, 2.0]) * (t + 1)
    updates, state = tx.update({"w": jnp.asarray(g)}, state, p)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    np.testing.assert_allclose(updates["w"], -lr * m / (np.sqrt(v) + eps), rtol=1e-5)  # google-research/bert
  tx_bc, _ = make_optimizer(_opt_config(name="adam", learning_rate=lr, eps=eps), 10)
  first, _ = tx_bc.update({"w": jnp.ones(3)}, tx_bc.init(p), p)
  np.testing.assert_allclose(first["w"], -lr, rtol=1e-5)  # bias-corrected Adam's first step is lr


@pytest.mark.slow
def test_parameter_groups_work_in_finetuning(tuners, sst):
  """optax.multi_transform leaves MaskedNodes in the state; the shared state layout keeps them."""
  tuner, feats = tuners(1)
  c = _config(sst)
  c.optimizer.groups = ({"pattern": "^encoder/embeddings", "name": "frozen"},)
  from spanlm.models.bert import BertConfig
  enc = BertConfig(vocab_size=len(VOCAB), num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                   max_position_embeddings=64, dropout_rate=0.0)
  grouped = finetune.Finetuner(c, tuner.task, enc, feats.arrays, num_steps=10)
  state = grouped.init_state(0)
  before = jax.device_get(state.params)
  batch = finetune._rows(feats.arrays, np.arange(16), 16)
  for _ in range(2):  # step 0 is warmup's lr 0
    state, _ = grouped.train_step(state, parallel.global_batch(batch, grouped.mesh))
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, after["encoder"]["embeddings"], before["encoder"]["embeddings"])
  assert not np.array_equal(after["classifier"]["kernel"], before["classifier"]["kernel"])


def test_import_checkpoint_out_that_is_a_file_is_one_line(tmp_path):
  import subprocess
  import sys
  out = tmp_path / "file"
  out.write_text("x")
  tool = os.path.join(os.path.dirname(__file__), "..", "tools", "import_checkpoint.py")
  proc = subprocess.run([sys.executable, tool, f"--src={tmp_path}", f"--out={out}"], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert f"error: --out={out} is a file, not a directory" in proc.stderr


def test_head_mask_reaches_the_finetuned_encoder(sst):
  c = _config(sst)
  c.model.head_mask = "0:1"
  cfg, _, _ = finetune.load_encoder(c)
  assert cfg.head_mask == ("0:1",)  # fine-tuning passes config.model.head_mask to the encoder


@pytest.mark.slow
def test_ablate_heads_reads_a_finished_run(full_run, tmp_path):
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
  import ablate_heads

  _, workdir = full_run
  for mode in ("zero", "uniform"):
    assert ablate_heads.main([f"--workdir={workdir}", f"--mode={mode}", f"--out={tmp_path}"]) == 0
    result = json.load(open(tmp_path / f"ablation_{mode}.json"))
    assert result["mode"] == mode and np.asarray(result["scores"]).shape == (1, 2)
