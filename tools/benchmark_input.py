"""Host input throughput: array_record read -> shuffle -> batch -> device_put, in tokens/s per host.

  python tools/benchmark_input.py --data=DIR --batch=256 --seconds=20
  python tools/benchmark_input.py --batch=256 --seq=128 --workers=2 --prefetch=2

--data is a prepared dataset (tools/prepare_corpus.py); without it the bundled
sample is prepared into --workdir first (not timed). The timed path is exactly
the training loop's: `pipeline.train_iterator` (grain MapDataset over the TFDS
array_record source: random-access reads of shuffled rows, batching), then
`parallel.global_batch` (device_put onto the mesh), blocked until on device.
With --workers > 0 grain reads and batches in that many worker processes
(`mp_prefetch`), overlapping I/O with the consumer. Compare the figure with the
device's consumption: BERT-base at seq 128 on one H100 eats ~1M tokens/s.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

_DATA = flags.DEFINE_string("data", None, "Prepared dataset dir; default: the bundled sample.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to prepare the sample (default: a temp dir).")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length (for preparing the sample).")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch (sequences).")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Timed duration.")
_WORKERS = flags.DEFINE_integer("workers", 0, "grain worker processes (0 = read in this process).")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "Batches buffered per worker.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")

TARGET_TOKENS_PER_SEC = 1.0e6  # BERT-base, seq 128, one H100 (docs/performance.md)


def measure(source, batch: int, seconds: float, workers: int, prefetch: int) -> dict:
  import jax

  from spanlm import parallel
  from spanlm.data import pipeline

  mesh = parallel.make_mesh(parallel_config(), jax.devices())
  it = pipeline.train_iterator(source, global_batch_size=batch, seed=0, rows=parallel.batch_rows(mesh, batch),
                               num_workers=workers, prefetch=prefetch)
  first = next(it)  # worker start-up and the first read are not timed
  seq = first["input_ids"].shape[1]
  jax.block_until_ready(parallel.global_batch(first, mesh, batch))
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(parallel.global_batch(next(it), mesh, batch))
    n += 1
  elapsed = time.perf_counter() - start
  tokens = n * batch * seq
  return {"tokens_per_sec_per_host": tokens / elapsed, "batches_per_sec": n / elapsed, "batches": n,
          "batch": batch, "seq": seq, "workers": workers, "prefetch": prefetch, "seconds": elapsed,
          "target_tokens_per_sec": TARGET_TOKENS_PER_SEC,
          "meets_target": tokens / elapsed >= TARGET_TOKENS_PER_SEC,
          "cpu_count": os.cpu_count(), "device": f"{len(jax.devices())}x {jax.devices()[0].device_kind}"}


def parallel_config():
  import ml_collections
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  from spanlm import paths
  from spanlm.data import prepare
  paths.check_bucket_or_exit(_OUT.value)  # a bad gs:// bucket: one line now, not after the measurement

  data = _DATA.value
  if data is None:
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="spanlm_input_bench_")
    data = prepare.ensure_prepared("", workdir, _SEQ.value)
  dataset = prepare.load_prepared(data)
  result = measure(dataset.train, _BATCH.value, _SECONDS.value, _WORKERS.value, _PREFETCH.value)
  result["data"] = data
  print(f"input pipeline: {result['tokens_per_sec_per_host']:,.0f} tokens/s per host "
        f"({result['batches_per_sec']:.1f} batches of {result['batch']}x{result['seq']}/s, "
        f"{result['workers']} workers, {result['cpu_count']} CPUs); target "
        f"{TARGET_TOKENS_PER_SEC:,.0f}: {'met' if result['meets_target'] else 'NOT met'}")
  print(json.dumps(result))
  if _OUT.value:
    paths.write_text_atomic(_OUT.value, json.dumps(result, indent=2))  # local or gs://


if __name__ == "__main__":
  app.run(main)
