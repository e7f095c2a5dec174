"""FedHelp's asymmetric dual knowledge-distillation losses (docs/algorithms.md §2.3–2.4) for binary heads.

A binary head emits one logit z; its two-class logits are [0, z] (softmax([0, z]) = [1 − σ(z), σ(z)]), so
KL and the ranking hinge are defined on those two classes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

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


def proxy_loss(
    proxy_logit: torch.Tensor, large_logit: torch.Tensor, y: torch.Tensor, *, kd_weight: float = 1.0
) -> torch.Tensor:
    """Large → proxy (full KD): CE(P(x), y) + kd_weight·KL(L(x) ‖ P(x)) at T = 1; L is frozen."""
    return F.binary_cross_entropy_with_logits(proxy_logit, y) + kd_weight * binary_kl(
        large_logit.detach(), proxy_logit
    )


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
        F.binary_cross_entropy_with_logits(large_logit, y)
        + kl_weight * binary_kl(p, large_logit)
        + rank_weight * ranking_hinge(large_logit, p, margin=margin, sign=sign)
    )
