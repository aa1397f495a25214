"""The run shared by tests/test_multihost.py (1 process, 8 devices) and its 2-process workers."""
import os

import numpy as np

V, L, B, STEPS = 512, 32, 16, 2


def make_trainer():
  import jax

  import spanlm
  from spanlm import parallel

  c = spanlm.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "span_bert.py:tiny"))
  c.train.batch_size, c.train.seq_len = B, L
  c.schedule.warmup_steps = 0
  c.mesh.data, c.mesh.fsdp, c.mesh.model = 2, 2, 2
  c.masking.scheme, c.objective.sbo = "token", False  # the smallest step to compile (3 times)
  table = np.zeros(V, bool)
  table[5:300] = True
  return spanlm.Trainer(c, V, table, parallel.make_mesh(c.mesh, jax.devices()))


def global_batch_rows(step):
  rng = np.random.default_rng(step)
  ids = rng.integers(5, V, size=(B, L)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids)}
