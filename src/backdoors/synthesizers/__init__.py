"""Triggers. Importing this package registers every synthesizer in SYNTHESIZERS."""

from backdoors.synthesizers import (  # noqa: F401,E501
    adaptive_blend,
    blend,
    bpp,
    calculator,
    complex,
    edge_case,
    input_aware,
    label_consistent,
    low_frequency,
    narcissus,
    pattern,
    physical,
    semantic,
    sig,
    trojan_nn,
    wanet,
)
from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer

__all__ = ["SYNTHESIZERS", "Synthesizer"]
