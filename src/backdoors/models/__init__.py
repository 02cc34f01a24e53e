"""Image models. Importing this package registers every model in MODELS."""

from backdoors.models import (  # noqa: F401
    convnext,
    densenet,
    efficientnet,
    fast_cifar,
    mobilenet,
    preact_resnet,
    resnet,
    simple_net,
    vgg,
    vit,
)
from backdoors.models.base import MODELS, ImageClassifier, Normalize

__all__ = ["MODELS", "ImageClassifier", "Normalize"]
