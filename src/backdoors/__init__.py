"""backdoors: backdoor attacks and defenses for deep learning models.

Public API: `load_config(path, overrides)`, `run(config)`, `resume(run_dir)`, and the
component registries.
"""

__version__ = "0.1.0"

from backdoors.attacks import ATTACKS, BALANCERS, LOSS_TERMS  # noqa: E402
from backdoors.config import load_config  # noqa: E402
from backdoors.data import TASKS  # noqa: E402
from backdoors.experiment import resume, run  # noqa: E402
from backdoors.models import MODELS  # noqa: E402
from backdoors.synthesizers import SYNTHESIZERS  # noqa: E402

__all__ = [
    "ATTACKS", "BALANCERS", "LOSS_TERMS", "MODELS", "SYNTHESIZERS", "TASKS", "__version__",
    "load_config", "resume", "run",
]
