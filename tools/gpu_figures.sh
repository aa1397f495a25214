#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one call (H100/H200; about 8 minutes once started).
#
# Prepare the wheels the GPU machine's Python lacks (/work/shared/wheels-py312/README.md) into an
# ignored .whl/ of the checkout, then, from the repository root, run it on the device machine with
# `.whl` carried:   bash tools/gpu_figures.sh        (results: $OUT/*.json, $OUT/log, table last)
#
# 1. the cuDNN attention kernel against the XLA path, outputs and gradients (tests/test_attention.py)
# 2. spanlm, auto attention (cuDNN) + bf16: BERT-base seq 128, BERT-large seq 512 (tools/benchmark.py)
# 3. Hugging Face BertForMaskedLM, same sizes: stock (--head=full) and gathered MLM head
# Targets (issue 12): BERT-large/512 >= 50% MFU and >= 1.5x transformers' tokens/s; BERT-base/128
# >= 45% MFU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_figures}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
exec > >(tee "$OUT/log") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

echo "== 1. cuDNN attention vs XLA (outputs, gradients)"
timeout 120 python3 -m pytest -q -x tests/test_attention.py -k "cudnn or xla or lengths" -p no:cacheprovider

run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" --out="$OUT/$name.json" | tail -2 || echo "$name: failed or timed out"
}
J="python3 tools/benchmark.py --config=experiments/bert.py --config.objective.name=mlm --config.model.dtype=bfloat16 --config.model.attention_impl=auto --steps=30 --warmup=5"
T="python3 tools/benchmark_torch_baseline.py --dtype=bfloat16 --steps=30 --warmup=5"
run jax_base128 120 $J --config.model.size=base --batch=128 --seq=128
run jax_large512 150 $J --config.model.size=large --batch=32 --seq=512
run torch_base128_full 150 $T --size=base --batch=128 --seq=128 --head=full
run torch_large512_full 180 $T --size=large --batch=32 --seq=512 --head=full
run torch_large512_gathered 150 $T --size=large --batch=32 --seq=512 --head=gathered

echo "== table"
python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows = {}
for name in ("jax_base128", "jax_large512", "torch_base128_full", "torch_large512_full", "torch_large512_gathered"):
  path = os.path.join(out, name + ".json")
  if os.path.exists(path):
    rows[name] = json.load(open(path))
print(f"{'run':26s} {'tokens/s':>12s} {'step ms':>9s} {'MFU':>7s} {'peak MiB':>9s}")
for name, r in rows.items():
  mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
  print(f"{name:26s} {r['tokens_per_sec']:12,.0f} {r['step_ms']:9.1f} {mfu:>7s} {(r.get('peak_memory_bytes') or 0) / 2**20:9,.0f}")
for size in ("base128", "large512"):
  j, t = rows.get(f"jax_{size}"), rows.get(f"torch_{size}_full")
  if j and t:
    print(f"{size}: spanlm / transformers (stock) = {j['tokens_per_sec'] / t['tokens_per_sec']:.2f}x")
EOF
