"""Distillation objectives, registered in `LOSSES` under the name `DistillConfig.loss` takes.

An objective takes the student's projected map and the teacher's tokens, both (B, C, h, w) on
the same grid, and returns its value (a scalar to minimise) and the metrics it logs beside it
(detached scalars; training logs them under their names, validation as `val_NAME`). Adding one
is one function and one decorator (in a plugin module too: `sonodistill.registry`):

    @LOSSES.register("token_l1", title="token L1 loss")
    def token_l1(student, teacher):
        loss = (student.float() - teacher.float()).abs().sum(1).mean()
        return loss, {"cosine": token_cosine(student, teacher)}

Built in: `token_mse` (Eq. 6, the paper's objective and the default), `token_cosine` (1 - cosine
per token: direction only) and `token_smooth_l1` (Huber per channel, summed like Eq. 6). All are
computed in fp32 so that bf16 autocast does not round the sums over 1536 channels, and all log the
mean token cosine, so that runs with different objectives stay comparable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sonodistill.distill.config import LOSSES

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")


def token_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 6: squared L2 distance per token, summed over channels, averaged over tokens and batch.

    Inputs are (B, C, h, w) token maps on the same grid; no feature normalisation.
    """
    _check(student, teacher)
    diff = student.float() - teacher.float()
    return diff.pow(2).sum(dim=1).mean()


@torch.no_grad()
def token_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token cosine similarity between student and teacher embeddings."""
    return F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()


@LOSSES.register("token_mse", title="token MSE loss (Eq. 6)")
def token_mse_loss(student: torch.Tensor, teacher: torch.Tensor):
    return token_mse(student, teacher), {"cosine": token_cosine(student, teacher)}


@LOSSES.register("token_cosine", title="token cosine loss (1 - cosine)")
def token_cosine_loss(student: torch.Tensor, teacher: torch.Tensor):
    _check(student, teacher)
    cosine = F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()
    return 1 - cosine, {"cosine": cosine.detach()}


@LOSSES.register("token_smooth_l1", title="token smooth-L1 loss")
def token_smooth_l1_loss(student: torch.Tensor, teacher: torch.Tensor):
    _check(student, teacher)
    per_channel = F.smooth_l1_loss(student.float(), teacher.float(), reduction="none", beta=1.0)
    return per_channel.sum(dim=1).mean(), {"cosine": token_cosine(student, teacher)}
