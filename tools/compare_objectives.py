r"""Pretrain several objectives at equal compute, fine-tune each on SST-2, tabulate.

  python tools/compare_objectives.py --glue_dir=/path/to/glue --out=/tmp/compare \
      --steps=200 --batch_size=16 --seq_len=128 --finetune_steps=150

Objectives (each experiment's :tiny preset): mlm, whole_word, span_sbo,
albert_sop, electra, mapnet. Writes OUT/compare.md, OUT/compare.json and
OUT/loss_curves.png (from each run's metrics.jsonl); the pretraining and
fine-tuning workdirs are under OUT/pretrain/<name> and OUT/sst2/<name>.
--glue_dir is required (use --glue_dir='' to skip fine-tuning).
"""

from absl import app, flags, logging

from spanlm import compare

_GLUE = flags.DEFINE_string("glue_dir", None, "GLUE directory holding SST-2/{train,dev}.tsv ('' = no fine-tuning).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_OBJ = flags.DEFINE_list("objectives", list(compare.OBJECTIVES), "Objectives to compare.")
_CORPUS = flags.DEFINE_string("corpus", "", "Pretraining corpus glob or prepared dir ('' = bundled sample).")
_STEPS = flags.DEFINE_integer("steps", 200, "Pretraining steps per objective.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Pretraining sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Pretraining tokens per sequence.")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 150, "SST-2 fine-tuning steps.")
_FT_BATCH = flags.DEFINE_integer("finetune_batch_size", 32, "SST-2 sequences per step.")
_FT_LR = flags.DEFINE_float("finetune_lr", 1e-4, "SST-2 peak learning rate (tiny models want ~1e-4).")
_FT_MAX = flags.DEFINE_integer("max_train_examples", 0, "Cap on SST-2 training rows (0 = all).")


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  unknown = [n for n in _OBJ.value if n not in compare.OBJECTIVES]
  if unknown:
    raise app.UsageError(f"unknown objectives {unknown}; choose from {sorted(compare.OBJECTIVES)}")
  rows = compare.compare(
      _OBJ.value, _OUT.value, _GLUE.value, steps=_STEPS.value, batch_size=_BATCH.value,
      seq_len=_SEQ.value, finetune_steps=_FT_STEPS.value, finetune_batch=_FT_BATCH.value,
      finetune_lr=_FT_LR.value, max_train_examples=_FT_MAX.value, corpus=_CORPUS.value)
  logging.info("wrote %s/compare.md, compare.json, loss_curves.png", _OUT.value)
  print(compare.markdown(rows))


if __name__ == "__main__":
  flags.mark_flags_as_required(["glue_dir", "out"])
  app.run(main)
