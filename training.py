"""Backdoors 101 entry point: python training.py --name NAME --params FILE [--commit X]."""

import sys

from backdoors.legacy import main

if __name__ == "__main__":
    sys.exit(main())
