"""REDI loss as pure tensor functions.

Xu et al., "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for
LLM Reasoning" (2025), Eq. (REDI):

    L(x, y_w, y_l) = -log pi(y_w | x) / |y_w|  +  alpha * log pi(y_l | x) / |y_l|

averaged over the batch, with |y| the number of completion tokens (clamped to >= 1). There
is no reference model and no beta. ``alpha = 0`` is length-normalised SFT on the chosen
responses; ``alpha = 1`` is the symmetric objective (the beta -> 0 limit of SimPO).
"""

from __future__ import annotations

import torch


def sequence_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths, per sequence.

    Args:
        per_token_logps: ``(B, T)`` log-probability of each target token.
        completion_mask: ``(B, T)`` 1 where the target token belongs to the completion.

    Returns:
        ``(logps, lengths)``, both of shape ``(B,)``; ``lengths`` is clamped to >= 1.
    """
    mask = completion_mask.to(per_token_logps.dtype)
    return (per_token_logps * mask).sum(dim=-1), mask.sum(dim=-1).clamp(min=1.0)


def redi_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    alpha: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The REDI objective (batch mean) and the length-normalised log-probs it is built from.

    Example:
        ```py
        >>> import torch
        >>> loss, c, r = redi_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2.0]), torch.tensor([3.0]))
        >>> round(loss.item(), 4)  # -(-4/2) + 0.8 * (-9/3)
        -0.4
        ```

    Returns:
        ``(loss, chosen_norm, rejected_norm)`` where ``*_norm = logps / lengths``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside [0, 1]; REDI uses 0.8 (alpha=0 is SFT, alpha=1 is symmetric).")
    chosen_norm = chosen_logps / chosen_lengths.clamp(min=1.0)
    rejected_norm = rejected_logps / rejected_lengths.clamp(min=1.0)
    loss = (-chosen_norm + alpha * rejected_norm).mean()
    return loss, chosen_norm, rejected_norm
