"""FedHelp's asymmetric dual knowledge-distillation losses (docs/algorithms.md §2.3–2.4).

A binary head emits one logit z (B,); its two-class logits are [0, z] (softmax([0, z]) = [1 − σ(z), σ(z)]),
so KL and the ranking hinge are defined on those two classes. A K-class head emits (B, K) logits, and the
same losses run on its K classes (softmax KL, the proxy's top class ranked above each of the others).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from hub.training.learners import task_loss

#: "agree": relu(m − (z_L[i] − z_L[j])) rewards the large model for ranking the proxy's top class first.
#: "snapshot": relu(z_L[i] − z_L[j]), the sign in the code snapshot, which penalises that agreement.
RankSign = Literal["agree", "snapshot"]


def binary_kl(
    teacher_logit: torch.Tensor, student_logit: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the batch of KL(softmax([0, t]/T) ‖ softmax([0, s]/T)) · T²; inputs (B,)."""
    t = teacher_logit / temperature
    s = student_logit / temperature
    log_p1, log_p0 = F.logsigmoid(t), F.logsigmoid(-t)  # teacher log-probabilities of class 1 / class 0
    log_q1, log_q0 = F.logsigmoid(s), F.logsigmoid(-s)
    kl = log_p1.exp() * (log_p1 - log_q1) + log_p0.exp() * (log_p0 - log_q0)  # (B,)
    return kl.mean() * temperature**2


def kl_to_soft_labels(target_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(F ‖ softmax(h)), target (B, C) probabilities, logits (B, C); 0·log 0 = 0."""
    log_q = F.log_softmax(student_logits, dim=1)
    safe = target_probs.clamp_min(1e-12)
    kl = torch.where(target_probs > 0, target_probs * (safe.log() - log_q), torch.zeros_like(log_q))
    return kl.sum(dim=1).mean()


def ranking_hinge(
    large_logit: torch.Tensor, proxy_logit: torch.Tensor, *, margin: float = 0.0, sign: RankSign = "agree"
) -> torch.Tensor:
    """Proxy→large ranking loss with k = 1 (binary), averaged by 1/(2k) and over the batch; inputs (B,).

    i is the proxy's top class (1 when its logit > 0, else 0) and j the other; on two-class logits [0, z_L]
    the large model's gap is z_L[i] − z_L[j] = +z_L if i = 1 else −z_L.
    """
    direction = torch.where(proxy_logit.detach() > 0, 1.0, -1.0)
    gap = direction * large_logit  # (B,)
    if sign == "agree":
        per_sample = F.relu(margin - gap)
    elif sign == "snapshot":
        per_sample = F.relu(gap)
    else:
        raise ValueError(f"unknown ranking sign {sign!r}; choose 'agree' or 'snapshot'")
    k = 1
    return (per_sample / (2 * k)).mean()


def class_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL between teacher and student class distributions at temperature T (×T²), batch mean.

    One logit per image (B,) is the binary form (``binary_kl``); (B, K) logits use the softmax over K.
    """
    if teacher_logits.ndim == 1:
        return binary_kl(teacher_logits, student_logits, temperature)
    target = torch.softmax(teacher_logits / temperature, dim=1)
    return kl_to_soft_labels(target, student_logits / temperature) * temperature**2


def class_ranking_hinge(
    large_logits: torch.Tensor, proxy_logits: torch.Tensor, *, margin: float = 0.0, sign: RankSign = "agree"
) -> torch.Tensor:
    """The ranking loss for (B, K) logits: i the proxy's top class, each other class j gives
    relu(m − (z_L[i] − z_L[j])) ("agree") or relu(z_L[i] − z_L[j]) ("snapshot"), averaged over the K − 1
    pairs and the batch. (B,) logits are the binary case (``ranking_hinge``)."""
    if large_logits.ndim == 1:
        return ranking_hinge(large_logits, proxy_logits, margin=margin, sign=sign)
    top = proxy_logits.detach().argmax(dim=1, keepdim=True)  # (B, 1)
    gap = large_logits.gather(1, top) - large_logits  # (B, K); 0 at the top class itself
    others = torch.ones_like(gap).scatter_(1, top, 0.0)
    if sign == "agree":
        per_pair = F.relu(margin - gap)
    elif sign == "snapshot":
        per_pair = F.relu(gap)
    else:
        raise ValueError(f"unknown ranking sign {sign!r}; choose 'agree' or 'snapshot'")
    return ((per_pair * others).sum(dim=1) / (2 * others.sum(dim=1))).mean()


def proxy_loss(
    proxy_logit: torch.Tensor, large_logit: torch.Tensor, y: torch.Tensor, *, kd_weight: float = 1.0
) -> torch.Tensor:
    """Large → proxy (full KD): CE(P(x), y) + kd_weight·KL(L(x) ‖ P(x)) at T = 1; L is frozen."""
    return task_loss(proxy_logit, y) + kd_weight * class_kl(large_logit.detach(), proxy_logit)


def large_loss(
    large_logit: torch.Tensor,
    proxy_logit: torch.Tensor,
    y: torch.Tensor,
    *,
    kl_weight: float = 0.1,
    rank_weight: float = 0.2,
    margin: float = 0.0,
    sign: RankSign = "agree",
) -> torch.Tensor:
    """Proxy → large (weak): CE(L(x), y) + kl_weight·KL(P ‖ L) + rank_weight·ranking; the proxy is frozen."""
    p = proxy_logit.detach()
    return (
        task_loss(large_logit, y)
        + kl_weight * class_kl(p, large_logit)
        + rank_weight * class_ranking_hinge(large_logit, p, margin=margin, sign=sign)
    )
