"""Multi-host: 2 processes x 4 CPU devices (gloo) train exactly like 1 process x 8 devices.

Each worker (tests/multihost_worker.py) calls jax.distributed.initialize, feeds
only its own half of every global batch (as pipeline.train_iterator splits by
process), and the two write one checkpoint together (orbax: each process its
shards). The losses and the restored parameters must equal this process's
8-device run of the same steps.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from spanlm import parallel
from spanlm.checkpoint import Checkpointer

sys.path.insert(0, os.path.dirname(__file__))
from multihost_common import STEPS, global_batch_rows, make_trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  address = f"localhost:{free_port()}"
  workers = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), address, str(i),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
  try:
    # Meanwhile the reference: the same steps in this process on 8 devices.
    trainer = make_trainer()
    state, expected = trainer.init_state(), []
    for step in range(STEPS):
      state, metrics = trainer.train_step(state, parallel.global_batch(global_batch_rows(step), trainer.mesh))
      expected.append(float(metrics["loss"]))
    for w in workers:
      out, _ = w.communicate(timeout=180)
      assert w.returncode == 0, out.decode()[-3000:]
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
  with open(tmp_path / "losses.json") as f:
    losses = json.load(f)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  restored, data_state = Checkpointer(str(tmp_path / "ckpt")).restore(STEPS, trainer.abstract_state)
  assert data_state == {"iterator": {"position": STEPS}}
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
