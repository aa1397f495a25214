"""One process of tests/test_multihost.py: 4 fake CPU devices, gloo collectives, 2 train steps.

Run as: python tests/multihost_worker.py COORDINATOR PROCESS_ID OUT_DIR
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(coordinator, process_id, out_dir):
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)
  import json

  import numpy as np

  sys.path.insert(0, os.path.dirname(__file__))
  from multihost_common import STEPS, make_trainer, global_batch_rows

  from spanlm import parallel
  from spanlm.checkpoint import Checkpointer

  assert jax.process_count() == 2 and len(jax.devices()) == 8
  trainer = make_trainer()
  state = trainer.init_state()
  losses = []
  for step in range(STEPS):
    rows = global_batch_rows(step)
    n = len(rows["input_ids"]) // 2
    local = {k: v[process_id * n:(process_id + 1) * n] for k, v in rows.items()}  # this host's rows
    state, metrics = trainer.train_step(state, parallel.global_batch(local, trainer.mesh))
    losses.append(float(metrics["loss"]))
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), async_save=False)  # every process writes its shards
  ckpt.save(STEPS, state, {"iterator": {"position": STEPS}})
  ckpt.close()
  if process_id == 0:
    with open(os.path.join(out_dir, "losses.json"), "w") as f:
      json.dump(losses, f)
  jax.distributed.shutdown()
  np.asarray(0)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
