"""spanlm against stock Hugging Face BertForMaskedLM on CPU, in one run, alternating; prints JSON.

  python tools/benchmark_cpu_side_by_side.py --torch_python=/tmp/torchvenv/bin/python \
      --sizes=tiny,mini --rounds=5 --steps=3

The torch side needs its own environment (torch's CPU wheel and transformers; spanlm never imports
torch): `python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0+cpu
transformers` (the CPU wheel: plain `torch` pulls the CUDA build).

For each size, two long-lived worker processes are started, one per side: spanlm's jitted train
step (tools/benchmark.py's `prepare`: on-device masking, encoder, MLM head on the gathered
positions, loss, AdamW) and HF `BertForMaskedLM` (tools/benchmark_torch_baseline.py's
`build_step`; `--torch_head=full`, the stock model: vocabulary projection at every token; eager
unless --torch_compile). Both compile/warm up first (not timed). Then, for `--rounds` rounds, the
driver asks spanlm, then torch (the order flips every round), to time `--steps` steps while the
other waits idle, so a shared host's load hits both sides alike. Reported: per side the median
over all timed steps of wall ms and tokens/s, CPU ms per step (process time, steadier on a loaded
host), the ratio spanlm ÷ torch of each round's tokens/s and its median, and the load average
before and after. Same shape on both sides: fp32, dropout 0.1, vocab 30522 (spanlm pads its table
to a multiple of 128), 15% predicted positions.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))


def _send(obj):
  print("@@" + json.dumps(obj), flush=True)


def _serve(step, sync, tokens_per_step):
  """Worker loop: each stdin line is a number of steps to time; answers one JSON line."""
  for line in sys.stdin:
    n = int(line)
    if n <= 0:
      return
    times = []
    c0 = time.process_time()
    for _ in range(n):
      t0 = time.perf_counter()
      step()
      sync()
      times.append(time.perf_counter() - t0)
    cpu_ms = (time.process_time() - c0) / n * 1e3
    _send({"step_s": times, "cpu_ms_per_step": cpu_ms, "tokens_per_step": tokens_per_step})


def spanlm_worker(args):
  import jax

  sys.path.insert(0, TOOLS)
  import benchmark  # tools/benchmark.py
  from spanlm.configs import load

  config = load(f"{args.config}")
  with config.unlocked():
    config.objective.name = "mlm"
    config.model.size = args.size
    config.model.dtype = "float32"
    for kv in args.override:
      key, value = kv.split("=", 1)
      node = config
      *path, leaf = key.split(".")
      for k in path:
        node = node[k]
      try:
        node[leaf] = ast.literal_eval(value)
      except (ValueError, SyntaxError):  # a bare string
        node[leaf] = value
  p = benchmark.prepare(config, args.batch, args.seq, args.vocab_size)
  compiled, frozen, data = p["compiled"], p["trainer"].frozen, p["data"]
  box = {"state": p["state"]}

  def step():
    box["state"], metrics = compiled(box["state"], data, frozen)
    box["metrics"] = metrics

  def sync():
    jax.block_until_ready((box["state"], box["metrics"]))

  for _ in range(args.warmup):
    step()
  sync()
  cfg = p["trainer"].model.cfg
  _send({"ready": True, "compile_s": p["compile_s"], "compile_cpu_s": p["compile_cpu_s"],
         "framework": "spanlm (jax)", "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
         "scan_layers": cfg.scanned, "remat": cfg.remat, "attention_impl": str(cfg.attention_impl),
         "versions": {"jax": jax.__version__}})
  _serve(step, sync, args.batch * args.seq)


def torch_worker(args):
  import torch
  import transformers

  sys.path.insert(0, TOOLS)
  import benchmark_torch_baseline as tb

  if args.threads:
    torch.set_num_threads(args.threads)
  preset = json.loads(args.preset)
  t0 = time.perf_counter()
  step, _, _ = tb.build_step(preset, batch=args.batch, seq=args.seq, vocab_size=args.vocab_size,
                             dtype="float32", head=args.torch_head, compile=args.torch_compile)
  for _ in range(1 + args.warmup):
    step()
  _send({"ready": True, "compile_s": time.perf_counter() - t0, "framework": "pytorch (transformers)",
         "head": args.torch_head, "compiled": args.torch_compile, "threads": torch.get_num_threads(),
         "versions": {"torch": torch.__version__, "transformers": transformers.__version__}})
  _serve(step, lambda: None, args.batch * args.seq)


class Worker:
  def __init__(self, cmd, env):
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

  def read(self):
    for line in self.proc.stdout:
      if line.startswith("@@"):
        return json.loads(line[2:])
    raise RuntimeError(f"worker {self.proc.args[:3]} exited with {self.proc.wait()} before answering")

  def run(self, steps):
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self):
    self.proc.stdin.write("0\n")
    self.proc.stdin.close()
    self.proc.wait()


def _side(rounds, ready):
  times = [t for r in rounds for t in r["step_s"]]
  tokens = rounds[0]["tokens_per_step"]
  step_s = statistics.median(times)
  return {**ready, "step_ms": step_s * 1e3, "tokens_per_sec": tokens / step_s,
          "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3, "timed_steps": len(times),
          "cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in rounds),
          "round_tokens_per_sec": [tokens / statistics.median(r["step_s"]) for r in rounds]}


def drive(args):
  from spanlm.models.bert import PRESETS

  env = dict(os.environ)
  common = [f"--batch={args.batch}", f"--seq={args.seq}", f"--vocab_size={args.vocab_size}",
            f"--warmup={args.warmup}"]
  results = []
  for size in args.sizes.split(","):
    load0 = os.getloadavg()
    me = [sys.executable, os.path.abspath(__file__), "--worker=spanlm", f"--size={size}",
          f"--config={args.config}", *common, *[f"--override={o}" for o in args.override]]
    them = [args.torch_python, os.path.abspath(__file__), "--worker=torch", f"--size={size}",
            f"--preset={json.dumps(PRESETS[size])}", f"--torch_head={args.torch_head}",
            f"--threads={args.threads}", *(["--torch_compile"] if args.torch_compile else []), *common]
    # One side compiles at a time, so neither's warm-up slows the other's.
    sides = {"spanlm": Worker(me, env)}
    ready = {"spanlm": sides["spanlm"].read()}
    sides["torch"] = Worker(them, env)
    ready["torch"] = sides["torch"].read()
    rounds = {"spanlm": [], "torch": []}
    for r in range(args.rounds):
      order = ("spanlm", "torch") if r % 2 == 0 else ("torch", "spanlm")
      for name in order:
        rounds[name].append(sides[name].run(args.steps))
      print(f"# {size} round {r + 1}/{args.rounds}: " + ", ".join(
          f"{n} {args.batch * args.seq / statistics.median(rounds[n][-1]['step_s']):,.0f} tokens/s"
          for n in ("spanlm", "torch")), file=sys.stderr, flush=True)
    for w in sides.values():
      w.close()
    s, t = _side(rounds["spanlm"], ready["spanlm"]), _side(rounds["torch"], ready["torch"])
    per_round = [a / b for a, b in zip(s["round_tokens_per_sec"], t["round_tokens_per_sec"])]
    results.append({
        "model": size, **PRESETS[size], "batch": args.batch, "seq": args.seq, "vocab_size": args.vocab_size,
        "dtype": "float32", "rounds": args.rounds, "steps_per_round": args.steps,
        "spanlm": s, "torch": t, "ratio_tokens_per_sec": s["tokens_per_sec"] / t["tokens_per_sec"],
        "ratio_per_round": per_round, "ratio_median_of_rounds": statistics.median(per_round),
        "ratio_cpu_time": t["cpu_ms_per_step"] / s["cpu_ms_per_step"],
        "loadavg_before": load0, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count()})
    r = results[-1]
    print(f"{size}: spanlm {s['tokens_per_sec']:,.0f} tokens/s, torch {t['tokens_per_sec']:,.0f} tokens/s, "
          f"ratio {r['ratio_tokens_per_sec']:.2f}x (median of rounds {r['ratio_median_of_rounds']:.2f}x, "
          f"CPU time {r['ratio_cpu_time']:.2f}x), load {load0[0]:.1f} -> {r['loadavg_after'][0]:.1f}",
          file=sys.stderr, flush=True)
  print(json.dumps(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="tiny,mini", help="comma-separated spanlm.models.bert.PRESETS names")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--vocab_size", type=int, default=30522)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--config", default=os.path.join(os.path.dirname(TOOLS), "experiments", "bert.py"))
  p.add_argument("--override", action="append", default=[],
                 help="spanlm config override key=value (e.g. model.remat=full), repeatable")
  p.add_argument("--torch_python", default=sys.executable, help="a Python with torch and transformers")
  p.add_argument("--torch_head", default="full", choices=["full", "gathered"],
                 help="full = stock BertForMaskedLM; gathered = MLM head on the masked positions only")
  p.add_argument("--torch_compile", action="store_true", help="torch.compile the loss (minutes on CPU)")
  p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
  p.add_argument("--out", default=None, help="also write the JSON here")
  p.add_argument("--worker", choices=["spanlm", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--size", help=argparse.SUPPRESS)
  p.add_argument("--preset", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker == "spanlm":
    spanlm_worker(args)
  elif args.worker == "torch":
    torch_worker(args)
  else:
    drive(args)


if __name__ == "__main__":
  main()
