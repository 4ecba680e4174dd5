"""`student:RUN_DIR`: the encoder a distill run made, read from its run folder.

The folder's config.yaml names the student's family and architecture (runs older than
`student.family` were timm CNNs) and `student_backbone.safetensors` holds its weights; the
encoder is then built by that family, so a distilled ConvNeXt, SAM2 trunk or plugin family
loads like a timm CNN. `student:NAME=FILE` reads a bare backbone file of a timm architecture.
"""

from __future__ import annotations

from pathlib import Path

from sonodistill.errors import UserError
from sonodistill.models.families.base import Encoder
from sonodistill.models.specs import (
    AUGMENT_TITLES,
    FAMILIES,
    RUN_CONFIG,
    STUDENT_WEIGHTS,
    EncoderSpec,
    read_run_config,
)


@FAMILIES.register("student")
class StudentRun(Encoder):
    """Not an encoder class of its own: `build` returns the run's family's encoder."""

    family = "student"
    title = "distilled student"

    @classmethod
    def resolve(cls, spec: EncoderSpec) -> EncoderSpec:
        """The spec the run folder (or bare file) stands for: the run's family, architecture,
        architecture overrides and backbone file; the label kept."""
        if not spec.weights:
            raise UserError("a student encoder needs the distill run dir (student:RUN_DIR)")
        path = Path(spec.weights)
        if not path.exists():
            raise UserError(f"{path}: no such distill run folder or backbone weights file")
        if path.is_file():
            if not spec.name:
                raise UserError(
                    f"{path}: a bare weights file needs its architecture (student:NAME=FILE)"
                )
            return spec.replace(family="timm")
        if not (path / RUN_CONFIG).is_file() or not (path / STUDENT_WEIGHTS).is_file():
            raise UserError(
                f"{path}: not a finished distill run ({RUN_CONFIG} or {STUDENT_WEIGHTS} missing)"
            )
        student = read_run_config(path).get("student")
        if not isinstance(student, dict) or not (spec.name or student.get("name")):
            raise UserError(f"{path / RUN_CONFIG}: no student.name")
        return EncoderSpec(
            family=str(student.get("family") or "timm"),
            name=spec.name or str(student["name"]),
            weights=str(path / STUDENT_WEIGHTS),
            label=spec.label,
            model_kwargs={**(student.get("model_kwargs") or {}), **spec.model_kwargs},
            options={**(student.get("options") or {}), **spec.options},
        )

    @classmethod
    def build(cls, spec: EncoderSpec) -> Encoder:
        inner = cls.resolve(spec)
        return FAMILIES.get(inner.family).build(inner)

    @classmethod
    def weights_file(cls, spec: EncoderSpec) -> Path | None:
        return Path(cls.resolve(spec).weights)

    @classmethod
    def recipe(cls, spec: EncoderSpec) -> dict:
        """What the run did, from its config.yaml alone (the ablation tables' columns, also for
        a run still training): augmentation, mixup, projection head, student and teacher
        architectures; a bare backbone file has no recipe on record."""
        path = Path(spec.weights or "")
        if not spec.weights or not path.exists():
            cls.resolve(spec)  # its message: what is missing
        if path.is_file():
            return {"init": "distilled"}
        config = read_run_config(path)
        try:
            student, teacher = config["student"], config["teacher"]
            projection = student.get("projection", student.get("head", "linear"))
            return {
                "init": "distilled",
                "augmentation": AUGMENT_TITLES.get(config["augment"], str(config["augment"])),
                "mixup": bool(config["mixup"]),
                "head": str(projection),
                "student": str(spec.name or student["name"]),
                "teacher": _teachers(config)
                or str(teacher.get("name") or teacher.get("family", "")),
            }
        except (KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{path / RUN_CONFIG}: not a distill run config ({err})") from err

    @classmethod
    def default_label(cls, spec: EncoderSpec) -> str:
        return f"{Path(spec.weights or 'student').name}-distill"


def _teachers(config: dict) -> str:
    """A multi-teacher run's teachers (`--teachers`), as `ARCH + ARCH`; empty for one teacher."""
    names = []
    for entry in config.get("teachers") or []:
        encoder = entry.get("encoder") if isinstance(entry, dict) else entry
        spec = EncoderSpec.parse(encoder, f"{RUN_CONFIG} teachers")
        names.append(spec.name or spec.family)
    return " + ".join(names)
