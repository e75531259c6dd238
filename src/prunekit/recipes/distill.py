"""Distillation losses from the dense teacher (the starting checkpoint unless another teacher is given).

As in the original recipes the distillation loss *replaces* the task loss (it is not added to it):

* GLUE, ``hidden_mse`` (default; the original's "variant 3", after Chen et al. 2022's reused-teacher-classifier
  idea): ``w * MSE(student last hidden state, teacher last hidden state)``. The student's encoder is pulled towards
  the teacher's features; since student and teacher start as the same fine-tuned checkpoint, the classifier that
  reads those features stays valid without training. prunekit averages the squared error over non-padding tokens
  (the original averaged over all positions of inputs padded to ``max_length``), so the loss does not depend on how
  a batch happens to be padded.
* GLUE, ``logit_kl``: ``w * T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (batch mean, Hinton et al.);
  regression tasks (STS-B) use ``w * MSE`` on the scores instead.
* SQuAD: ``(w/2) * KL_T(start) + (w/2) * KL_T(end)`` with T = 2, each ``KL`` batch-mean and multiplied by ``T^2``.
  Padding positions are masked out of both distributions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GLUE_DISTILL_LOSSES = ("hidden_mse", "logit_kl")
_NEG = -1e4


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between two ``(batch, seq, hidden)`` states, over non-padding tokens."""
    diff = (student_hidden.float() - teacher_hidden.float()) ** 2
    if attention_mask is None:
        return diff.mean()
    mask = attention_mask.to(diff.dtype).unsqueeze(-1)
    denom = mask.sum() * diff.shape[-1]
    return (diff * mask).sum() / denom.clamp_min(1.0)


def kl_with_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean over the first dimension."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def glue_distill_loss(kind: str, student_out, teacher_out, attention_mask: torch.Tensor | None, weight: float,
                      temperature: float = 2.0, regression: bool = False) -> torch.Tensor:
    """The GLUE distillation loss ``kind`` (``hidden_mse`` or ``logit_kl``) times ``weight``."""
    if kind == "hidden_mse":
        return weight * hidden_mse(student_out.hidden_states[-1], teacher_out.hidden_states[-1], attention_mask)
    if kind == "logit_kl":
        if regression:
            return weight * F.mse_loss(student_out.logits.float(), teacher_out.logits.float())
        return weight * kl_with_temperature(student_out.logits, teacher_out.logits, temperature)
    raise ValueError(f"distill_loss: got {kind!r}; allowed: {', '.join(GLUE_DISTILL_LOSSES)}")


def qa_distill_loss(student_out, teacher_out, attention_mask: torch.Tensor | None, weight: float,
                    temperature: float = 2.0) -> torch.Tensor:
    """``(w/2)·KL_T(start) + (w/2)·KL_T(end)``, padding positions masked out of both distributions."""

    def masked(logits):
        logits = logits.float()
        if attention_mask is not None:
            logits = logits.masked_fill(attention_mask == 0, _NEG)
        return logits

    start = kl_with_temperature(masked(student_out.start_logits), masked(teacher_out.start_logits), temperature)
    end = kl_with_temperature(masked(student_out.end_logits), masked(teacher_out.end_logits), temperature)
    return weight / 2 * start + weight / 2 * end
