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

from spanlm.configs import base_config, load as load_config, validate as validate_config
from spanlm.masking import (MaskedBatch, apply_masking, mask_spans, mask_tokens, mask_whole_words,
                            max_predictions)
from spanlm.models.bert import PRESETS, BertConfig, BertEncoder, config_for
from spanlm.models.heads import BertForPretraining, SpanBoundaryHead
from spanlm.objectives import (Predictions, pretraining_sums, select_predictions, summarize,
                               total_loss, weighted_cross_entropy)
from spanlm.optim import make_optimizer
from spanlm.parallel import make_mesh
from spanlm.train import Trainer, TrainState, build_model, train_and_evaluate

__version__ = "0.1.0"

__all__ = [
    "BertConfig", "BertEncoder", "BertForPretraining", "MaskedBatch", "PRESETS", "Predictions",
    "SpanBoundaryHead", "TrainState", "Trainer", "apply_masking", "base_config", "build_model",
    "config_for", "load_config", "make_mesh", "make_optimizer", "mask_spans", "mask_tokens",
    "mask_whole_words", "max_predictions", "pretraining_sums", "select_predictions", "summarize",
    "total_loss", "train_and_evaluate", "validate_config", "weighted_cross_entropy",
]
