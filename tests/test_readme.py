"""The README is part of the product: its Python example must run, and its test command must be CI's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'python -m pip install -q "torch==2.13.0" -e ".[test]" && python -m pytest'
    assert command in readme and command in ci


def test_readme_structmat_commands_parse():
    """Every `structmat ...` line of the README's shell blocks names a real command with flags it takes (parsed, not
    run; `bench` commands own their parsers and are checked by name only)."""
    import shlex

    from structmat.cli import build_parser

    parser = build_parser()
    benches = {"kernels", "infer", "state-tracking", "mixer-speed", "train-compare"}
    seen = 0
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words or words[0] != "structmat":
                continue
            seen += 1
            if words[1:2] == ["bench"]:
                assert words[2] in benches, line
                continue
            try:
                parser.parse_args(words[1:])
            except SystemExit:
                raise AssertionError(f"README command does not parse: {line}") from None
    assert seen >= 10
