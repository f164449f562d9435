"""The `cns` command without the pipeline extras: the library commands work, and a pipeline
command ends in one line that says what to install (the packages are hidden from the import
system the way a machine without them would fail, in a child process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WITHOUT_EXTRAS = ("import sys\n"
                  "for name in ('boto3', 'botocore', 'mlflow', 'prefect', 'dvc'):\n"
                  "    sys.modules[name] = None  # import of it raises ModuleNotFoundError\n"
                  "from flows.cli import main\n"
                  "sys.exit(main(sys.argv[1:]))\n")


def cns_without_extras(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd)})


def test_a_pipeline_command_without_the_extras_is_a_one_line_error(tmp_path):
    result = cns_without_extras("run-once", "--workspace", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "cns: error: `cns run-once` needs the pipeline extras (prefect is not installed): "
        "pip install 'cns-pipeline[pipeline]'"]


def test_library_commands_still_work_without_the_extras(tmp_path):
    result = cns_without_extras("info", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: cns info" in result.stdout
