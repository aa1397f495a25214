"""The one way in and out of a run directory, local or `gs://`.

Everything that opens a workdir goes through here: pretraining (`train.py`),
fine-tuning from a pretraining run, the distillation teacher, EWC's Fisher,
the LR range test and the tools. A workdir holds

  config.json        the resolved config (written once it is checked against the workdir)
  data.json          which prepared dataset and tokenizer the run trains on
  data/<hash>/       the prepared corpus (prepare.ensure_prepared)
  checkpoints/<step> Orbax checkpoints, restored only through `checkpoint.Checkpointer`
  checkpoints_corrupt/  checkpoints that failed their integrity check
  metrics.jsonl, tensorboard/

Paths are `etils.epath.Path` (the type Orbax uses), so a `gs://bucket/run`
URL works wherever a local path does; local paths are made absolute, URLs never
are (`os.path.abspath("gs://b/r")` would be `<cwd>/gs:/b/r`).

Prepared array_record data on gs://: array_record reads local files only, so
process 0 prepares into a local folder, uploads it to `WORKDIR/data/<hash>/`
(meta file last), and every host reads it from a per-host local cache
(`$SPANLM_DATA_CACHE`, default `/tmp/spanlm_data_cache/<hash>`), copied once.
A gcsfuse mount given as a local path (`--config.data.corpus=/gcs/bucket/prep`)
works too and is read in place (docs/tpu.md).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from etils import epath

from spanlm.paths import access_error, is_remote, open_append, path  # noqa: F401  (the workdir API)

# Fields that may change between invocations of one run: the loop's knobs, the mesh (resume on
# another topology), where the corpus is spelled. Everything else shapes the checkpoint or the data.
MAY_CHANGE = ("train.num_steps", "train.stop_at_step", "train.log_every", "train.eval_every",
              "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
              "train.max_nonfinite_steps", "train.spike_window", "train.spike_k",
              "train.inject_nonfinite_steps", "mesh.", "data.corpus", "data.tokenizer",
              "distill.teacher_workdir")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    name = f"{prefix}{k}"
    if any(name == f or (f.endswith(".") and name.startswith(f)) for f in MAY_CHANGE):
      continue
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, name + ".")
    elif a != b:
      out.append(f"{name} {a!r} -> {b!r}")
  return out


class Workdir:
  """A run directory. `Workdir(p).checkpointer()`, `.read_config()`, `.prepare_data(config)`..."""

  def __init__(self, root):
    self.root = path(root)

  def __str__(self):
    return str(self.root)

  @property
  def remote(self) -> bool:
    return is_remote(self.root)

  config_file = property(lambda self: self.root / "config.json")
  data_file = property(lambda self: self.root / "data.json")
  metrics_file = property(lambda self: self.root / "metrics.jsonl")
  tensorboard_dir = property(lambda self: self.root / "tensorboard")
  checkpoints_dir = property(lambda self: self.root / "checkpoints")

  # --- access --------------------------------------------------------------------------------
  def _guard(self, what, fn):
    try:
      return fn()
    except OSError as e:
      if self.remote:
        raise access_error(self.root, e) from e
      raise ValueError(f"workdir {self.root} is not {what} ({e.strerror or e}); choose another "
                       f"--workdir") from e
    except Exception as e:  # gcsfs/google-auth raise their own types
      if self.remote:
        raise access_error(self.root, e) from e
      raise

  def exists(self) -> bool:
    return self._guard("readable", self.root.exists)

  def is_dir(self) -> bool:
    """True for a local folder, or a gs:// prefix that holds at least one object."""
    return self._guard("readable", self.root.is_dir)

  def has_config(self) -> bool:
    return self._guard("readable", self.config_file.exists)

  def check_writable(self) -> None:
    """Create the workdir and write/delete a probe named for this process (never shared)."""
    import jax

    def probe():
      self.root.mkdir(parents=True, exist_ok=True)
      name = self.root / f".write_test.{jax.process_index()}.{os.getpid()}"
      name.write_text("ok")
      name.unlink()

    self._guard("writable", probe)

  # --- config --------------------------------------------------------------------------------
  def read_config(self) -> ml_collections.ConfigDict | None:
    if not self._guard("readable", self.config_file.exists):
      return None
    return ml_collections.ConfigDict(json.loads(self.config_file.read_text()))

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Raise (touching nothing) if `config` differs from the workdir's in a field that shapes the run."""
    old = self.read_config()
    if old is None:
      return
    changed = _diff(old.to_dict(), json.loads(config.to_json_best_effort()))
    if changed:
      raise ValueError(f"workdir {self.root} holds a run with a different config ({'; '.join(changed[:6])}"
                       f"{'; ...' if len(changed) > 6 else ''}); use a new --workdir, or the config "
                       f"the run was started with (its config.json)")

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    import jax
    if jax.process_index() == 0:
      self.config_file.write_text(config.to_json_best_effort(indent=2))

  # --- data and tokenizer --------------------------------------------------------------------
  def prepare_data(self, config: ml_collections.ConfigDict):
    """The prepared dataset for `config.data` and `config.train.seq_len` (prepared if needed),
    with its tokenizer loaded: (PreparedDataset, Tokenizer). Records it in data.json."""
    import jax

    from spanlm.data import prepare
    from spanlm.data.tokenizer import Tokenizer

    d = config.data
    data_dir = prepare.ensure_prepared(d.corpus, self.root, config.train.seq_len, tokenizer=d.tokenizer,
                                       vocab_size=d.vocab_size, validation_fraction=d.validation_fraction,
                                       packing=d.packing, strict=not d.get("skip_bad_files", False))
    dataset = prepare.load_prepared(prepare.local_copy(data_dir))
    tokenizer = Tokenizer.load(dataset.tokenizer_path)
    if dataset.vocab_size != tokenizer.vocab_size:
      raise ValueError(f"prepared dataset {data_dir} was written with a vocabulary of {dataset.vocab_size}, "
                       f"but its tokenizer has {tokenizer.vocab_size}; re-prepare it")
    if jax.process_index() == 0:
      record = {"data_dir": str(data_dir), "tokenizer": str(epath.Path(data_dir) / dataset.meta["tokenizer"])}
      self.data_file.write_text(json.dumps(record, indent=1))
    return dataset, tokenizer

  def tokenizer_path(self, config: ml_collections.ConfigDict | None = None) -> str:
    """The tokenizer this run trained with (a local file: fetched to the cache if remote)."""
    from spanlm.data import prepare
    config = config if config is not None else self.read_config()
    if self.data_file.exists():
      return prepare.local_file(json.loads(self.data_file.read_text())["tokenizer"])
    found = sorted(self.root.glob("data/*/*.model"))  # workdirs written before data.json
    if found:
      return prepare.local_file(found[0])
    tok = config.data.get("tokenizer", "") if config is not None else ""
    if tok:
      return prepare.local_file(tok)
    from spanlm.data import sample
    return sample.tokenizer_path()

  # --- checkpoints ---------------------------------------------------------------------------
  def checkpointer(self, **kwargs):
    from spanlm import checkpoint
    return checkpoint.Checkpointer(self.root, **kwargs)

  def has_checkpoints(self) -> bool:
    return self._guard("readable", self.checkpoints_dir.exists)

  def latest(self, abstract_state=None):
    """(step, state, data) of the newest intact checkpoint (digest-checked, with fallback).

    Without `abstract_state` the arrays come back as NumPy in their saved tree (for
    readers that only need parameters: fine-tuning, a teacher, EWC's theta*).
    """
    if not self.has_checkpoints():
      raise FileNotFoundError(f"workdir {self.root} holds no checkpoints/; give the --workdir of a "
                              f"spanlm pretraining run")
    checkpointer = self.checkpointer(async_save=False)
    try:
      restored = checkpointer.restore_latest(abstract_state)
    finally:
      checkpointer.close()
    if restored is None:
      raise FileNotFoundError(f"{self.checkpoints_dir} holds no checkpoint")
    return restored


def open_run(config: ml_collections.ConfigDict, workdir) -> tuple[Workdir, Any, Any]:
  """For a run that trains in `workdir`: (Workdir, PreparedDataset, Tokenizer).

  Order matters: the config is checked against the workdir before anything is
  written (a mismatching rerun leaves the workdir byte for byte as it was), then
  the data is prepared, and config.json is written last.
  """
  from spanlm import resilience
  wd = Workdir(workdir)
  wd.check_config(config)
  wd.check_writable()
  dataset, tokenizer = wd.prepare_data(config)
  wd.write_config(config)
  resilience.barrier("open_run")
  return wd, dataset, tokenizer


def load_pretrained(workdir) -> tuple[ml_collections.ConfigDict, str, int, Any]:
  """(the run's config, its tokenizer path, step, params as NumPy) of a pretraining workdir's newest
  intact checkpoint: what fine-tuning, a distillation teacher and the tools start from."""
  wd = Workdir(workdir)
  config = wd.read_config()
  if config is None or not wd.has_checkpoints():
    raise FileNotFoundError(f"workdir {wd.root} has no config.json or checkpoints/; give the --workdir "
                            f"of a spanlm pretraining run")
  step, state, _ = wd.latest()
  return config, wd.tokenizer_path(config), step, state["params"]
