"""Re-run a script of scripts/ with nixfs' venv python (pyfuse3, trio, apsw, nixfs itself)
when it was started with another one, e.g. through its ``#!/usr/bin/env python3`` line."""

import os
import sys


def ensure() -> None:
    venv = os.environ.get("NIXFS_VENV", "/opt/nixfs/venv")
    python = os.path.join(venv, "bin", "python")
    if os.path.realpath(sys.prefix) != os.path.realpath(venv) and os.access(python, os.X_OK):
        os.execv(python, [python, *sys.argv])
