"""Several frozen teachers at once (`--teachers`), and per-teacher target standardisation.

    TeacherSet      the teachers, run one after the other (frozen, no autograd, under the run's
                    autocast), each target standardised by its own statistics
    estimate        those statistics from a pass over the first training images
    combined        the summed weighted objective with per-teacher metrics

Agglomerative distillation (AM-RADIO, RADIOv2.5) matches one student to several teachers, each
through its own projection head at its own token grid. Teachers of very different feature
scales would drown each other in a plain sum (a ViT-B's tokens and a Hiera's differ by an order
of magnitude), hence `--standardize`:

- `mean_std`: per channel, (t - mean_c) / std_c;
- `phi_s`: (t - mean_c) / sigma with ONE sigma per teacher, sqrt(trace(Cov) / C). This is PHI-S
  (Ranzinger et al. 2024, "PHI-S: Distribution Balancing for Label-Free Multi-Teacher
  Distillation") with its Hadamard rotation left out: the rotation makes every channel's
  variance the mean eigenvalue, and the token MSE and cosine objectives are
  invariant to an orthogonal rotation (a linear head learns it), so only the mean and the one
  scale change the objective. Our own code because no kept library offers it.

A single `--teacher` without standardisation never comes here (the paper's recipe, unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from sonodistill.distill.config import LOSSES, DistillConfig, TeacherTerm, teacher_labels
from sonodistill.models import Teacher

EPS = 1e-6


class TeacherSet(nn.Module):
    """The run's teachers and their standardisation; forward gives one target per teacher."""

    def __init__(
        self,
        terms: list[TeacherTerm],
        labels: list[str],
        configs: list | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        self.terms, self.labels = terms, labels
        configs = configs or [t.teacher_config(f"--teachers[{i}]") for i, t in enumerate(terms)]
        self.teachers = nn.ModuleList(Teacher(c, image_size) for c in configs)
        for i, teacher in enumerate(self.teachers):
            self.register_buffer(f"shift{i}", torch.zeros(teacher.out_channels, 1, 1))
            self.register_buffer(f"scale{i}", torch.ones(teacher.out_channels, 1, 1))
        self.mode = "none"

    @property
    def out_channels(self) -> list[int]:
        return [t.out_channels for t in self.teachers]

    @property
    def weights_info(self) -> list[dict]:
        """What run_info.json records per teacher: its label, weight, objective and file."""
        return [
            {"label": label, "weight": term.weight, "loss": term.loss, **t.weights_info}
            for label, term, t in zip(self.labels, self.terms, self.teachers, strict=True)
        ]

    def check_input_size(self, size: int, what: str = "--image_size") -> None:
        for teacher in self.teachers:
            teacher.check_input_size(size, what)

    def train(self, mode: bool = True) -> TeacherSet:
        return super().train(False)

    def stats(self) -> dict[str, torch.Tensor]:
        """The standardisation buffers (what a checkpoint keeps for an exact resume)."""
        return {k: v.detach().cpu() for k, v in self.named_buffers() if k[:5] in ("shift", "scale")}

    def load_stats(self, stats: dict[str, torch.Tensor], mode: str) -> None:
        for name, value in stats.items():
            getattr(self, name).copy_(value)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> one standardised target (B, C_i, h_i, w_i) per teacher, in fp32.
        The teachers run one after the other under inference mode (no autograd records, no
        version counters); the standardisation outside it makes the targets normal tensors,
        which objectives may save for their backward (the cosine does)."""
        with torch.inference_mode():
            raw = [teacher(x) for teacher in self.teachers]
        with torch.no_grad():
            return [
                (t.float() - getattr(self, f"shift{i}")) / getattr(self, f"scale{i}")
                for i, t in enumerate(raw)
            ]


def build_teachers(cfg: DistillConfig) -> Teacher | TeacherSet:
    """The paper's single Teacher when one teacher is asked for without standardisation (bit for
    bit the recipe as it was); a TeacherSet otherwise."""
    if not cfg.teachers and cfg.standardize == "none":
        return Teacher(cfg.teacher, cfg.image_size)
    from sonodistill.distill.config import teacher_terms

    terms = teacher_terms(cfg)
    configs = None if cfg.teachers else [cfg.teacher]
    labels = teacher_labels(terms) if cfg.teachers else ["teacher"]
    return TeacherSet(terms, labels, configs, cfg.image_size)


@torch.no_grad()
def estimate(teachers: TeacherSet, batches, mode: str) -> dict:
    """Per-teacher mean and scale from `batches` (normalised images) into the set's buffers;
    returns what run_info.json records (images, channel means' spread and the scales)."""
    n = len(teachers.teachers)
    sums, tokens, images = [0.0] * n, [0] * n, 0
    for x in batches:
        for i, teacher in enumerate(teachers.teachers):
            t = teacher(x).double()
            flat = t.transpose(0, 1).reshape(t.shape[1], -1)  # (C, tokens)
            sums[i] = sums[i] + torch.stack([flat.sum(1), flat.pow(2).sum(1)])
            tokens[i] += flat.shape[1]
        images += x.shape[0]
    record = {"mode": mode, "images": images, "teachers": {}}
    for i, (label, s) in enumerate(zip(teachers.labels, sums, strict=True)):
        mean = s[0] / tokens[i]
        var = (s[1] / tokens[i] - mean.pow(2)).clamp_min(0)
        if mode == "mean_std":
            scale = var.sqrt().clamp_min(EPS)
        else:  # phi_s: one scale, sqrt of the mean variance over channels (module doc)
            scale = var.mean().sqrt().clamp_min(EPS).expand_as(var)
        getattr(teachers, f"shift{i}").copy_(mean.float()[:, None, None])
        getattr(teachers, f"scale{i}").copy_(scale.float()[:, None, None])
        record["teachers"][label] = {
            "channels": int(mean.numel()),
            "mean_abs_mean": float(mean.abs().mean()),
            "scale_min": float(scale.min()),
            "scale_max": float(scale.max()),
            "rms_before": float((var + mean.pow(2)).mean().sqrt()),
        }
    teachers.mode = mode
    return record


def combined(cfg: DistillConfig, teachers: TeacherSet):
    """The summed objective sum_i w_i * L_i(student_i, teacher_i); logs each teacher's loss and
    metrics as LABEL_loss, LABEL_NAME, and the mean cosine over teachers as `cosine` (so runs
    of one and several teachers stay comparable)."""
    parts = [
        (label, term.weight, LOSSES.get(term.loss or cfg.loss, f"--teachers[{i}].loss"))
        for i, (label, term) in enumerate(zip(teachers.labels, teachers.terms, strict=True))
    ]

    def objective(preds: list[torch.Tensor], targets: list[torch.Tensor]):
        total, metrics, cosines = 0.0, {}, []
        for (label, weight, fn), pred, target in zip(parts, preds, targets, strict=True):
            loss, extra = fn(pred, target)
            total = total + weight * loss
            metrics[f"{label}_loss"] = loss.detach()
            metrics.update({f"{label}_{k}": v for k, v in extra.items()})
            if "cosine" in extra:
                cosines.append(extra["cosine"])
        if cosines:
            metrics["cosine"] = torch.stack(cosines).mean()
        return total, metrics

    return objective
