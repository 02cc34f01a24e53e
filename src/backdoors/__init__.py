"""backdoors: backdoor attacks and defenses for deep learning models."""

__version__ = "0.1.0"
