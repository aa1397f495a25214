"""PyTorch baseline for tools/benchmark.py: Hugging Face BertForMaskedLM, the same training step.

  python tools/benchmark_torch_baseline.py --size=base --batch=32 --seq=128 --steps=50
  python tools/benchmark_torch_baseline.py --size=large --batch=32 --seq=512 --dtype=bfloat16

One step = forward + MLM loss on 15% of the tokens (positions drawn once, like
spanlm's static P per row), backward, AdamW (fused on CUDA), zero_grad. bf16
autocast with fp32 master weights (as spanlm's config.model.dtype=bfloat16),
SDPA attention, and torch.compile unless --no_compile. --head=gathered runs
the MLM head only at the masked positions (spanlm's way); --head=full is the
stock BertForMaskedLM (vocabulary projection at every token, labels -100
elsewhere). Throughput and MFU use spanlm.flops, the same analytic FLOPs as
the JAX benchmark. Optional dependency: torch + transformers; spanlm itself
never imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from spanlm import flops  # no JAX import: this runs in a torch-only environment too

# BERT's preset names, as spanlm.models.bert.PRESETS (not imported: it pulls JAX and Flax in).
SIZES = ("tiny", "mini", "small", "medium", "base", "large")


def presets() -> dict:
  from spanlm.models.bert import PRESETS
  return PRESETS


def build_step(preset: dict, batch: int, seq: int, vocab_size: int = 30522, dtype: str = "bfloat16",
               head: str = "gathered", compile: bool = True):
  """One training step of HF BertForMaskedLM of shape `preset` (num_layers, hidden_size, num_heads,
  intermediate_size) on synthetic ids: returns (step, device, model); step() returns the loss."""
  import torch
  import transformers

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cfg = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=preset["hidden_size"], num_hidden_layers=preset["num_layers"],
      num_attention_heads=preset["num_heads"], intermediate_size=preset["intermediate_size"],
      max_position_embeddings=max(512, seq), attn_implementation="sdpa")
  model = transformers.BertForMaskedLM(cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                          **({"fused": True} if device.type == "cuda" else {}))

  g = torch.Generator().manual_seed(0)
  ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
  ids[:, 0], ids[:, -1] = 2, 3
  num_pred = flops.num_predictions(seq)
  positions = torch.stack([torch.randperm(seq - 2, generator=g)[:num_pred] + 1
                           for _ in range(batch)]).sort(-1).values
  targets = ids.gather(1, positions)
  inputs = ids.scatter(1, positions, 4)  # [MASK]
  labels = torch.full_like(ids, -100).scatter(1, positions, targets)
  inputs, labels, positions, targets = (t.to(device) for t in (inputs, labels, positions, targets))
  attention_mask = torch.ones_like(inputs)

  def loss_fn():
    if head == "full":
      return model(input_ids=inputs, attention_mask=attention_mask, labels=labels).loss
    hidden = model.bert(input_ids=inputs, attention_mask=attention_mask).last_hidden_state
    gathered = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.cls(gathered)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

  amp_dtype = torch.bfloat16 if dtype == "bfloat16" else None

  def step():
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
      loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  if compile:
    loss_fn = torch.compile(loss_fn)
  return step, device, model


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="base", choices=SIZES)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--vocab_size", type=int, default=30522)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="autocast compute dtype (parameters stay float32)")
  p.add_argument("--head", default="gathered", choices=["gathered", "full"])
  p.add_argument("--no_compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
  p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
  p.add_argument("--out", default=None, help="also write the JSON here")
  args = p.parse_args()
  try:
    import torch
    import transformers
  except ImportError as e:
    raise SystemExit(f"error: the baseline needs torch and transformers ({e}); "
                     f"pip install torch transformers") from e

  if args.threads:
    torch.set_num_threads(args.threads)
  preset = presets()[args.size]
  step, device, model = build_step(preset, batch=args.batch, seq=args.seq, vocab_size=args.vocab_size,
                                   dtype=args.dtype, head=args.head, compile=not args.no_compile)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  step()
  sync()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  sync()
  times = []
  cpu0 = time.process_time()  # CPU seconds of all threads: steadier than wall time on a shared host
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  cpu_ms_per_step = (time.process_time() - cpu0) / len(times) * 1e3

  per_seq = flops.train_flops_per_sequence(
      num_layers=preset["num_layers"], hidden_size=preset["hidden_size"],
      intermediate_size=preset["intermediate_size"], vocab_size=args.vocab_size, seq_len=args.seq,
      num_predictions=flops.num_predictions(args.seq))
  kind = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
  peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
  result = {
      "framework": "pytorch (transformers)",
      **flops.throughput(step_seconds=step_s, batch_size=args.batch, seq_len=args.seq,
                         flops_per_sequence=per_seq, device_kind=kind),
      "peak_memory_bytes": peak,
      "peak_memory_source": "torch.cuda.max_memory_allocated" if peak is not None else "unavailable",
      "device": f"1x {kind}", "model": args.size,
      "num_params": sum(p.numel() for p in model.parameters()), "batch": args.batch, "seq": args.seq,
      "dtype": args.dtype, "attention_impl": "sdpa", "head": args.head, "compiled": not args.no_compile,
      "vocab_size": args.vocab_size, "steps": args.steps, "step_ms_min": min(times) * 1e3,
      "step_ms_max": max(times) * 1e3, "compile_s": compile_s,
      "cpu_ms_per_step": cpu_ms_per_step, "final_loss": float(loss),
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
  }
  mfu = "n/a (unknown peak)" if result["mfu"] is None else f"{result['mfu']:.1%}"
  print(f"HF BertForMaskedLM {args.size} batch {args.batch} x seq {args.seq} {args.dtype} on {kind}: "
        f"{result['step_ms']:.1f} ms/step, {result['tokens_per_sec']:,.0f} tokens/s, "
        f"{result['model_tflops_per_sec']:.3f} TFLOP/s, MFU {mfu}")
  print(json.dumps(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
