"""Image models. Importing this package registers every model in MODELS."""

from backdoors.models import preact_resnet, resnet, simple_net, vgg  # noqa: F401
from backdoors.models.base import MODELS, ImageClassifier, Normalize

__all__ = ["MODELS", "ImageClassifier", "Normalize"]
