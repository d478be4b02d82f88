"""Small real-text corpora for the training tests: a few files copied from this Python's standard library."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

# The key of each document is "corpus/<name>", so a test's train/validation split by file is fixed.
STDLIB_FILES = ["bisect.py", "heapq.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "colorsys.py",
                "string.py", "queue.py", "sched.py", "keyword.py", "copy.py", "abc.py", "numbers.py"]


def stdlib_corpus(folder: Path, names: list[str] = STDLIB_FILES) -> Path:
    """``folder/corpus`` holding copies of the named standard-library files; returns that directory."""
    root = folder / "corpus"
    root.mkdir()
    std = Path(sysconfig.get_paths()["stdlib"])
    for name in names:
        shutil.copy(std / name, root / name)
    return root
