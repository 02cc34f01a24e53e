"""backdoors: backdoor attacks and defenses for deep learning models.

Public API: `load_config(path, overrides)`, `run(config)`, `resume(run_dir)`,
`defend(run_dir, name, options)`, and the component registries.
"""

from backdoors.assembly.defending import defend
from backdoors.attacks import ATTACKS, BALANCERS, LOSS_TERMS
from backdoors.config import load_config
from backdoors.data import TASKS
from backdoors.experiment import resume, run
from backdoors.models import MODELS
from backdoors.synthesizers import SYNTHESIZERS
from backdoors.version import __version__

__all__ = [
    "ATTACKS", "BALANCERS", "LOSS_TERMS", "MODELS", "SYNTHESIZERS", "TASKS", "__version__",
    "defend", "load_config", "resume", "run",
]
