"""`python -m backdoors` runs the CLI."""

import sys

from backdoors.cli import main

sys.exit(main())
