"""Teacher, student and downstream encoders of every model family (see `models.encoders`).

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

from sonodistill.utils.lazy import lazy_exports

_EXPORTS = {
    "IMAGENET_MEAN": "sonodistill.models.preprocess",
    "IMAGENET_STD": "sonodistill.models.preprocess",
    "to_model_input": "sonodistill.models.preprocess",
    "Encoder": "sonodistill.models.encoders",
    "build_encoder": "sonodistill.models.encoders",
    "encoder_label": "sonodistill.models.encoders",
    "encoder_recipe": "sonodistill.models.encoders",
    "resolve_spec": "sonodistill.models.encoders",
    "weights_file": "sonodistill.models.encoders",
    "EncoderSpec": "sonodistill.models.specs",
    "FAMILIES": "sonodistill.models.specs",
    "RANDOM": "sonodistill.models.specs",
    "StudentConfig": "sonodistill.models.specs",
    "TeacherConfig": "sonodistill.models.specs",
    "Student": "sonodistill.models.student",
    "Teacher": "sonodistill.models.teacher",
    "WeightsMismatchError": "sonodistill.models.weights",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
