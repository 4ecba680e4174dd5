"""Teacher (DINOv3 ViT), student (any timm CNN) and downstream encoders."""

from sonodistill.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from sonodistill.models.student import Student, StudentConfig
from sonodistill.models.teacher import Teacher, TeacherConfig, WeightsMismatchError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Student",
    "StudentConfig",
    "Teacher",
    "TeacherConfig",
    "WeightsMismatchError",
    "to_model_input",
]
