"""The ESMM loss over whole candidate sets, and logits -> probabilities.

Column 0 of the logits is the impression tower, columns 1.. are p(action | impression) towers.
The loss trains p(imp) on impressions and the joint p(imp)·p(action | imp) on actions, over
*all* real candidates (IFA §4.3), so no tower is trained only on the impressed few.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def log_joint_probabilities(logits: Tensor) -> Tensor:
    """log p(imp) and log p(imp)·p(action | imp), same shape as logits (B, M, 1 + A)."""
    log_p = F.logsigmoid(logits)
    return torch.cat([log_p[..., :1], log_p[..., :1] + log_p[..., 1:]], dim=-1)


def joint_probabilities(logits: Tensor) -> Tensor:
    """p(imp) and p(imp)·p(action | imp): what each objective's AUC is computed on."""
    return log_joint_probabilities(logits).exp()


def esmm_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Sum over objectives of the mean BCE over real candidates.

    logits and labels (B, M, 1 + A); mask (B, M), True for real candidates. Computed in log space
    so that a product of two small probabilities never underflows to log(0).
    """
    log_p = log_joint_probabilities(logits)
    # log(1 - p) = log(-expm1(log p)); clamp keeps p < 1 so the gradient stays finite.
    log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))
    bce = -(labels * log_p + (1.0 - labels) * log_not_p)  # (B, M, 1 + A)
    weights = mask.to(bce.dtype)[..., None]
    return (bce * weights).sum(dim=(0, 1)).div(weights.sum().clamp(min=1.0)).sum()
