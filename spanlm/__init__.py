"""spanlm: BERT-family pretraining in JAX/Flax, as composable functions.

The functional pieces a notebook needs:

    import spanlm
    config = spanlm.load_config("experiments/span_bert.py:tiny")
    masked = spanlm.mask_spans(rng, input_ids, word_start_table, vocab_size=8000)
    trainer = spanlm.Trainer(config, vocab_size, word_start_table)
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, batch)

`spanlm.train_and_evaluate(config, workdir)` is the whole command-line job.
"""

# name -> module. Imported on first use (PEP 562), so `import spanlm.tasks.rouge` or
# `import spanlm.data.wordpiece` does not load JAX, Flax and Orbax.
_EXPORTS = {
    "base_config": "spanlm.configs", "load_config": "spanlm.configs:load",
    "validate_config": "spanlm.configs:validate",
    "MaskedBatch": "spanlm.objectives.masking", "apply_masking": "spanlm.objectives.masking",
    "mask_spans": "spanlm.objectives.masking", "mask_tokens": "spanlm.objectives.masking",
    "mask_whole_words": "spanlm.objectives.masking", "max_predictions": "spanlm.objectives.masking",
    "PRESETS": "spanlm.models.bert", "BertConfig": "spanlm.models.bert",
    "BertEncoder": "spanlm.models.bert", "config_for": "spanlm.models.bert",
    "BertForPretraining": "spanlm.models.heads", "SpanBoundaryHead": "spanlm.models.heads",
    "Predictions": "spanlm.objectives.losses", "pretraining_sums": "spanlm.objectives.losses",
    "select_predictions": "spanlm.objectives.losses", "summarize": "spanlm.objectives.losses",
    "total_loss": "spanlm.objectives.losses", "weighted_cross_entropy": "spanlm.objectives.losses",
    "make_optimizer": "spanlm.optim", "make_mesh": "spanlm.parallel",
    "Trainer": "spanlm.train", "TrainState": "spanlm.train", "build_model": "spanlm.train",
    "train_and_evaluate": "spanlm.train",
}


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'spanlm' has no attribute {name!r}")
  import importlib
  module, _, attr = _EXPORTS[name].partition(":")
  value = getattr(importlib.import_module(module), attr or name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "BertConfig", "BertEncoder", "BertForPretraining", "MaskedBatch", "PRESETS", "Predictions",
    "SpanBoundaryHead", "TrainState", "Trainer", "apply_masking", "base_config", "build_model",
    "config_for", "load_config", "make_mesh", "make_optimizer", "mask_spans", "mask_tokens",
    "mask_whole_words", "max_predictions", "pretraining_sums", "select_predictions", "summarize",
    "total_loss", "train_and_evaluate", "validate_config", "weighted_cross_entropy",
]
