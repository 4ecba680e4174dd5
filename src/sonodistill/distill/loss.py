"""Token-wise distillation objective (Eq. 6) and the cosine metric logged beside it."""

import torch
import torch.nn.functional as F


def token_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 6: squared L2 distance per token, summed over channels, averaged over tokens and batch.

    Inputs are (B, C, h, w) token maps on the same grid; no feature normalisation. Computed in
    fp32 so that bf16 autocast does not round the sum over 1536 channels.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    diff = student.float() - teacher.float()
    return diff.pow(2).sum(dim=1).mean()


@torch.no_grad()
def token_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token cosine similarity between student and teacher embeddings."""
    return F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()
