"""Teacher, student and downstream encoders of every model family (see `models.encoders`)."""

from sonodistill.models.encoders import Encoder, EncoderSpec, build_encoder, parse_spec
from sonodistill.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from sonodistill.models.student import Student, StudentConfig
from sonodistill.models.teacher import Teacher, TeacherConfig
from sonodistill.models.weights import WeightsMismatchError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderSpec",
    "Student",
    "StudentConfig",
    "Teacher",
    "TeacherConfig",
    "WeightsMismatchError",
    "build_encoder",
    "parse_spec",
    "to_model_input",
]
