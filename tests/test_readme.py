"""The README's commands work as written: its Python examples, its shell blocks marked
"# runs as written" (in an empty folder, with the real base model), and its test command is
what CI runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARK = "# runs as written"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def shell_blocks() -> list[str]:
    return [b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if b.startswith(MARK)]


@pytest.mark.real_model
def test_readme_shell_blocks_marked_as_runnable_run_as_written(tmp_path: Path) -> None:
    blocks = shell_blocks()
    assert blocks, f"no ```bash block starts with {MARK!r}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in blocks:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f"{block}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    # What the block claims it made: a verified export, a registry with the node enrolled.
    assert (tmp_path / "export" / "model.sig").is_file()
    assert (tmp_path / "registry" / "metadata" / "1.root.json").is_file()
    assert (tmp_path / "trusted").is_dir()


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z]+)\b", README))
    assert named and named <= targets, named - targets
