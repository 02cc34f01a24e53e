"""Triggers. Importing this package registers every synthesizer in SYNTHESIZERS."""

from backdoors.synthesizers import pattern  # noqa: F401
from backdoors.synthesizers.base import SYNTHESIZERS, Synthesizer

__all__ = ["SYNTHESIZERS", "Synthesizer"]
