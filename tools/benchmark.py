"""Time spanlm's jitted pretraining step and report throughput, MFU and memory as JSON.

  python tools/benchmark.py --config=experiments/bert.py --batch=32 --seq=128 --steps=50
  python tools/benchmark.py --config=experiments/span_bert.py:large --batch=32 --seq=512 \
      --config.model.dtype=bfloat16 --config.model.attention_impl=cudnn --config.model.remat=none
  python tools/benchmark.py --config=experiments/bert.py --config.model.size=large --steps=0  # compile only

Synthetic token ids (uniform over the vocabulary, [CLS]/[SEP] framed) feed the
real train step (masking, encoder, heads, loss, AdamW) on the mesh that
config.mesh gives over all devices. Compilation and `--warmup` steps are
excluded; each timed step is synchronised with `block_until_ready` and the
median is reported. FLOPs are analytic (spanlm/flops.py), the same formula as
tools/benchmark_torch_baseline.py, so the two MFUs compare. Variants are
--config overrides: model.size, model.dtype, model.attention_impl, model.remat,
model.scan_layers.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/bert.py.",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (sequences); default config.train.batch_size.")
_SEQ = flags.DEFINE_integer("seq", None, "Sequence length; default config.train.seq_len.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (the median is reported); 0 = compile only "
                              "(compile_s and hlo_lines of the abstract state, nothing allocated).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_VOCAB = flags.DEFINE_integer("vocab_size", 30522, "Vocabulary (BERT's WordPiece: 30522).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")


def peak_memory_bytes(device, compiled) -> tuple[int | None, str]:
  """Device allocator peak where the backend reports one (GPU/TPU), else XLA's static estimate."""
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "memory_stats"
  m = compiled.memory_analysis()
  if m is None:
    return None, "unavailable"
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return int(total), "memory_analysis"


def prepare(config, batch: int, seq: int, vocab_size: int, abstract: bool = False):
  """The Trainer, a synthetic global batch, the train state (abstract: shapes only) and the
  compiled train step, with compile_s / compile_cpu_s / hlo_lines (tools/benchmark_cpu_side_by_side.py
  reuses it)."""
  import numpy as np

  from spanlm import parallel
  from spanlm.train import Trainer

  config.train.batch_size, config.train.seq_len = batch, seq
  config.train.grad_accum_steps = 1
  mesh = parallel.make_mesh(config.mesh)
  trainer = Trainer(config, vocab_size, np.ones(vocab_size, bool), mesh)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab_size, size=(batch, seq)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
  local = {"input_ids": ids, "segment_ids": np.zeros_like(ids)}
  if config.data.packing == "packed":  # one document per row: same FLOPs, exercises the mask
    local.update(position_ids=np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
                 packing_ids=np.ones_like(ids))
  data = parallel.global_batch(local, mesh)
  state = trainer.abstract_state if abstract else trainer.init_state()

  t0, c0 = time.perf_counter(), time.process_time()
  compiled = trainer._train_step_jit.lower(state, data, trainer.frozen).compile()
  compile_s = time.perf_counter() - t0
  compile_cpu_s = time.process_time() - c0  # CPU seconds: steadier than wall time on a shared host
  hlo_lines = len(compiled.as_text().splitlines())  # optimized HLO: grows with unrolled depth
  return dict(trainer=trainer, mesh=mesh, data=data, state=state, compiled=compiled, compile_s=compile_s,
              compile_cpu_s=compile_cpu_s, hlo_lines=hlo_lines)


def run_benchmark(config, batch: int, seq: int, steps: int, warmup: int, vocab_size: int) -> dict:
  import jax
  import jaxlib
  import numpy as np

  from spanlm import flops, parallel
  from spanlm.models import attention

  p = prepare(config, batch, seq, vocab_size, abstract=not steps)
  trainer, mesh, data, state, compiled = p["trainer"], p["mesh"], p["data"], p["state"], p["compiled"]
  compile_s, compile_cpu_s, hlo_lines = p["compile_s"], p["compile_cpu_s"], p["hlo_lines"]
  cfg = trainer.model.cfg
  if not steps:
    return {"framework": "spanlm (jax)", "model": config.model.size, "num_layers": cfg.num_layers,
            "scan_layers": cfg.scanned, "batch": batch, "seq": seq, "dtype": config.model.dtype,
            "remat": config.model.remat, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
            "hlo_lines": hlo_lines,
            "device": f"{len(jax.devices())}x {jax.devices()[0].device_kind} ({jax.default_backend()})",
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__}}
  for _ in range(warmup):
    state, _ = compiled(state, data, trainer.frozen)
  jax.block_until_ready(state)
  times = []
  cpu0 = time.process_time()  # CPU seconds of all threads: steadier than wall time on a shared host
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data, trainer.frozen)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  cpu_ms_per_step = (time.process_time() - cpu0) / len(times) * 1e3

  per_seq = flops.bert_train_flops_per_sequence(cfg, seq, config.masking.rate, sbo=bool(config.objective.sbo))
  device = jax.devices()[0]
  peak, peak_source = peak_memory_bytes(device, compiled)
  dp = parallel.data_parallel_size(mesh)
  estimate = flops.memory_estimate(
      num_params=trainer.num_params(), batch_per_device=batch // dp, seq_len=seq,
      num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_heads=cfg.num_heads, param_shards=mesh.shape["fsdp"] * mesh.shape["model"],
      act_bytes=np.dtype(config.model.dtype).itemsize, remat=config.model.remat)
  return {
      "framework": "spanlm (jax)",
      **flops.throughput(step_seconds=step_s, batch_size=batch, seq_len=seq, flops_per_sequence=per_seq,
                         device_kind=device.device_kind, num_devices=len(jax.devices())),
      "peak_memory_bytes": peak,
      "peak_memory_source": peak_source,
      "memory_estimate_bytes": estimate,
      "device": f"{len(jax.devices())}x {device.device_kind} ({jax.default_backend()})",
      "mesh": dict(mesh.shape),
      "model": config.model.size, "num_params": trainer.num_params(), "batch": batch, "seq": seq,
      "dtype": config.model.dtype, "num_layers": cfg.num_layers, "scan_layers": cfg.scanned,
      "attention_impl": attention.resolve(cfg.attention_impl, cfg.dtype),
      "remat": config.model.remat, "sbo": bool(config.objective.sbo), "vocab_size": cfg.vocab_size,
      "steps": steps, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
      "compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "hlo_lines": hlo_lines, "cpu_ms_per_step": cpu_ms_per_step, "final_loss": float(metrics["loss"]),
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
  }


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  from spanlm import paths
  paths.check_bucket_or_exit(_OUT.value)  # a bad gs:// bucket: one line now, not after the benchmark
  config = _CONFIG.value
  result = run_benchmark(config, _BATCH.value or config.train.batch_size, _SEQ.value or config.train.seq_len,
                         _STEPS.value, _WARMUP.value, _VOCAB.value)
  if not _STEPS.value:
    print(f"{result['model']} ({result['num_layers']} layers, scan_layers={result['scan_layers']}): "
          f"compiled in {result['compile_s']:.1f} s ({result['compile_cpu_s']:.1f} CPU s), "
          f"{result['hlo_lines']:,} HLO lines")
  else:
    _print_summary(result)
  print(json.dumps(result))
  if _OUT.value:
    paths.write_text_atomic(_OUT.value, json.dumps(result, indent=2))  # local or gs://


def _print_summary(result):
  mfu = "n/a (unknown peak)" if result["mfu"] is None else f"{result['mfu']:.1%}"
  print(f"{result['model']} batch {result['batch']} x seq {result['seq']} {result['dtype']} on "
        f"{result['device']}: {result['step_ms']:.1f} ms/step, {result['tokens_per_sec']:,.0f} tokens/s, "
        f"{result['model_tflops_per_sec']:.3f} TFLOP/s, MFU {mfu}, peak memory "
        f"{(result['peak_memory_bytes'] or 0) / 2**20:,.0f} MiB ({result['peak_memory_source']}; "
        f"estimate {result['memory_estimate_bytes']['total_bytes'] / 2**20:,.0f} MiB)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
