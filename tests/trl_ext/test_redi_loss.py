"""REDI's loss as a pure function (``trl_ext.redi.loss``) against hand-computed values."""

import torch

from trl_ext.redi import redi_loss


def test_redi_loss_function_closed_form():
    loss, c, r = redi_loss(
        torch.tensor([-4.0, -6.0]),
        torch.tensor([-9.0, -2.0]),
        torch.tensor([2.0, 3.0]),
        torch.tensor([3.0, 0.0]),
        alpha=0.5,
    )
    # second rejected length 0 is clamped to 1
    assert torch.allclose(loss, torch.tensor(((2.0 + 0.5 * -3.0) + (2.0 + 0.5 * -2.0)) / 2))  # 0.75
    assert torch.equal(r, torch.tensor([-3.0, -2.0]))
