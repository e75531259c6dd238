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
* Causal LMs (``prunekit distill``, :mod:`prunekit.recipes.llm_distill`): ``KL_T`` of the next-token logits, a
  mean over every token, plus ``w_h * mean_i MSE(student layer i, teacher layer map[i])`` over the decoder
  layers' outputs when ``w_h > 0``. A student with fewer layers than its teacher matches layer ``i`` (0-based) to
  teacher layer ``round((i + 1) * L_t / L_s) - 1``, so the last layers always meet (:func:`uniform_layer_map`).
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


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """Teacher layer (0-based) whose output student layer ``i`` is matched to: ``round((i+1)·L_t/L_s) − 1``.

    Equal depths give the identity; a shallower student spreads its layers evenly over the teacher's and its
    last layer meets the teacher's last (whose hidden state both models normalise the same way).
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1; got student {student_layers}, teacher {teacher_layers}")
    return tuple(max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers))


def causal_lm_distill_loss(student_out, teacher_out, temperature: float = 1.0, hidden_weight: float = 0.0,
                           layer_map: tuple[int, ...] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``KL_T`` of the logits (mean over every token) ``+ hidden_weight · mean MSE`` of the matched layers.

    ``student_out`` / ``teacher_out`` are causal-LM outputs (``logits`` ``[batch, seq, vocab]``; with
    ``hidden_weight > 0`` also ``hidden_states`` from ``output_hidden_states=True``: the embeddings, then one
    entry per decoder layer). ``layer_map[i]`` is the teacher layer student layer ``i`` is matched to. Returns
    the loss and its parts as floats (``kl``, ``hidden``).
    """
    s_logits, t_logits = student_out.logits, teacher_out.logits
    vocab = s_logits.shape[-1]
    # one row per token: batchmean is then the mean over tokens, whatever the batch and sequence shape
    kl = kl_with_temperature(s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab), temperature)
    parts = {"kl": float(kl.detach())}
    if hidden_weight <= 0:
        return kl, parts
    s_hidden, t_hidden = student_out.hidden_states[1:], teacher_out.hidden_states[1:]
    mapping = layer_map or uniform_layer_map(len(s_hidden), len(t_hidden))
    mse = torch.stack([hidden_mse(s_hidden[i], t_hidden[j]) for i, j in enumerate(mapping)]).mean()
    parts["hidden"] = float(mse.detach())
    return kl + hidden_weight * mse, parts
