"""The distillation student (objectives/distill.py holds the losses and the objective):
BertForPretraining plus TinyBERT's W_h projection to the teacher's width.
"""

from __future__ import annotations

import jax.numpy as jnp

from spanlm.models.bert import dense
from spanlm.models.heads import BertForPretraining


class DistilStudent(BertForPretraining):
  """BertForPretraining + W_h (`distill_project`) to the teacher's width when the widths differ."""

  teacher_hidden: int = 0

  def setup(self):
    super().setup()
    if self.teacher_hidden and self.teacher_hidden != self.cfg.hidden_size:
      self.distill_project = dense(self.cfg, self.teacher_hidden, ("embed", "embed_out"), "distill_project")

  def project(self, hidden):
    if self.teacher_hidden and self.teacher_hidden != self.cfg.hidden_size:
      return self.distill_project(hidden)
    return hidden

  def __call__(self, *args, **kwargs):
    out = super().__call__(*args, **kwargs)
    if self.teacher_hidden and self.teacher_hidden != self.cfg.hidden_size:
      self.project(jnp.zeros((1, self.cfg.hidden_size), self.cfg.dtype))  # creates W_h at init
    return out
