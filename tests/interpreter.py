"""Running a test module's Triton checks through the interpreter, in a subprocess: TRITON_INTERPRET must be set
before triton is imported, and the rest of the suite may already have imported it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: A hang guard, not a deadline: the slowest report takes about a minute on a busy 2-core machine.
HANG_GUARD_S = 1800


def interpreter_report(script: str) -> dict:
    """Run ``python script --interpret`` with TRITON_INTERPRET=1; its last stdout line is a JSON report."""
    pytest.importorskip("triton")  # (in the test extra; without it only the interpreter tests skip)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, script, "--interpret"], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
