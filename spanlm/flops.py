"""Analytic FLOPs, peak rates and MFU for BERT pretraining: one formula for every tool.

Model FLOPs utilisation (Chowdhery et al. 2022, "PaLM", App. B) is
    MFU = (model FLOPs per step / step time) / peak dense FLOP/s of the device,
with model FLOPs counted analytically, not from what the compiler runs (so
rematerialisation does not count, and both benchmarks, JAX and PyTorch, are
scored by the same function).

For one training sequence of L tokens with P predicted (masked) positions:
    F = 6 · N_enc · L  +  12 · n_layers · L² · H  +  6 · N_head · P
- 6·N per token: a matmul weight does 2 FLOPs per token forward, 4 backward
  (Kaplan et al. 2020, "Scaling laws", §2.1); N_enc = the encoder's matmul
  weights, n_layers · (4·H² + 2·H·I). Embedding lookups, biases, LayerNorm,
  GELU and softmax are not counted (standard practice; <1% at BERT sizes).
- Attention scores QKᵀ and the weighted sum AV: 2·2·L·H per token forward,
  ×3 for forward + backward = 12·n_layers·L·H per token.
- The MLM head runs only on the P gathered positions: N_head = H² (transform)
  + H·V (tied decoder); SBO adds 3H·H + H·H + H·V per predicted position.
Forward-only FLOPs (inference, `model_summary`) are F / 3.
"""

from __future__ import annotations

import math

# Peak dense (no sparsity) bf16 FLOP/s by device kind; matched by substring of
# `jax.Device.device_kind` / `torch.cuda.get_device_name()`, first hit wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of a device, or None where unknown (CPUs)."""
  for key, peak in PEAK_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


def encoder_matmul_params(num_layers: int, hidden_size: int, intermediate_size: int) -> int:
  """Matmul weights of the encoder: Q, K, V, O (4·H²) and the FFN (2·H·I) per layer."""
  return num_layers * (4 * hidden_size ** 2 + 2 * hidden_size * intermediate_size)


def head_matmul_params(hidden_size: int, vocab_size: int, sbo: bool = False) -> int:
  """Matmul weights applied per predicted position: MLM transform + decoder (+ SBO)."""
  n = hidden_size ** 2 + hidden_size * vocab_size
  if sbo:
    n += (2 * hidden_size + 200) * hidden_size + hidden_size ** 2 + hidden_size * vocab_size  # SBO (200-wide positions)
  return n


def train_flops_per_sequence(*, num_layers: int, hidden_size: int, intermediate_size: int,
                             vocab_size: int, seq_len: int, num_predictions: int,
                             sbo: bool = False) -> float:
  """Model FLOPs of one forward + backward pass over one sequence (module docstring)."""
  dense = 6 * encoder_matmul_params(num_layers, hidden_size, intermediate_size) * seq_len
  attention = 12 * num_layers * seq_len ** 2 * hidden_size
  head = 6 * head_matmul_params(hidden_size, vocab_size, sbo) * num_predictions
  return float(dense + attention + head)


def forward_flops_per_sequence(**kwargs) -> float:
  """Forward-only model FLOPs (a third of training's)."""
  return train_flops_per_sequence(**kwargs) / 3


def num_predictions(seq_len: int, rate: float = 0.15) -> int:
  """P, the static number of gathered positions per row (as `masking.max_predictions`)."""
  return math.ceil(rate * seq_len)


def bert_train_flops_per_sequence(cfg, seq_len: int, masking_rate: float = 0.15,
                                  sbo: bool = False) -> float:
  """`train_flops_per_sequence` for a `BertConfig` (or anything with its field names)."""
  return train_flops_per_sequence(
      num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      vocab_size=cfg.vocab_size, seq_len=seq_len, num_predictions=num_predictions(seq_len, masking_rate),
      sbo=sbo)


def throughput(*, step_seconds: float, batch_size: int, seq_len: int, flops_per_sequence: float,
               device_kind: str, num_devices: int = 1) -> dict:
  """The benchmark JSON fields shared by the JAX and PyTorch benchmarks."""
  tflops = flops_per_sequence * batch_size / step_seconds / 1e12
  peak = peak_flops(device_kind)
  return {
      "step_ms": step_seconds * 1e3,
      "tokens_per_sec": batch_size * seq_len / step_seconds,
      "sequences_per_sec": batch_size / step_seconds,
      "model_tflops_per_sec": tflops,
      "mfu": None if peak is None else tflops * 1e12 / (peak * num_devices),
      "flops_per_sequence": flops_per_sequence,
  }


def memory_estimate(*, num_params: int, batch_per_device: int, seq_len: int, num_layers: int,
                    hidden_size: int, intermediate_size: int, num_heads: int,
                    param_shards: int = 1, act_bytes: int = 4, remat: str = "none") -> dict:
  """Rough per-device training memory in bytes: fp32 params + grads + Adam (m, v) + activations.

  Parameters, gradients and the two Adam moments are 4 bytes each, divided by
  the number of devices that shard them (`param_shards` = fsdp × model).
  Activations saved for the backward pass, per layer and token: about
  10·H + 2·I values (inputs of the 6 matmuls, LayerNorm/GELU/residual inputs)
  plus the attention probabilities, heads·L per token, when the attention is
  not fused (XLA's attention on CPU materialises them). `remat='full'` keeps
  only each layer's input (H per token). Compare with `memory_analysis()`.
  """
  state = 4 * 4 * num_params / param_shards
  tokens = batch_per_device * seq_len
  per_token_layer = (hidden_size if remat == "full"
                     else 10 * hidden_size + 2 * intermediate_size + num_heads * seq_len)
  activations = act_bytes * tokens * num_layers * per_token_layer
  return {"params_bytes": 4 * num_params / param_shards, "optimizer_and_grad_bytes": 12 * num_params / param_shards,
          "activation_bytes": float(activations), "total_bytes": float(state + activations)}
