"""The `backdoors` command: train, validate, crashtest, sweep, report, data, list, show,
defend, gallery.

Usage, config, data and run-folder errors print one line on stderr and exit with code 2;
a run that failed (diverged, say) prints one line and exits with 1; an interrupted run
exits with 130. Never a traceback (set BACKDOORS_DEBUG=1 to see one for an unexpected
error).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from backdoors.cli import grids, looks, runs
from backdoors.cli.parser import parser
from backdoors.errors import report

HANDLERS = {"train": runs.train, "validate": runs.validate, "crashtest": runs.crashtest,
            "sweep": grids.sweep, "report": grids.report, "data": grids.data,
            "list": looks.list_components, "show": looks.show, "defend": looks.defend,
            "gallery": looks.gallery}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `backdoors` console script."""
    try:
        args = parser().parse_args(argv)
        code = HANDLERS[args.command](args)
        sys.stdout.flush()  # a reader that left shows here, inside the handlers below
        return code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output left (`backdoors list ... | head`): stop quietly, as
        # Unix tools do; stdout goes to /dev/null so the exit's final flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (errors.report)
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
