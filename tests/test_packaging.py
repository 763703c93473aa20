"""The packaging promises: importable packages, no shadowed stdlib, console scripts, a lint-clean tree."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sysconfig.get_path("scripts"))


def test_packages_import_next_to_the_stdlib_operator_module() -> None:
    import operator

    import ling_operator
    import ling_runtime

    stdlib = Path(sysconfig.get_path("stdlib")).resolve()
    # The stdlib module, not our package: it lives in the stdlib and has its usual functions.
    assert Path(operator.__file__).resolve().parent == stdlib
    assert operator.add(2, 3) == 5
    assert Path(ling_operator.__file__).resolve().parent == ROOT / "operator" / "ling_operator"
    assert Path(ling_runtime.__file__).resolve().parent == ROOT / "runtime" / "ling_runtime"


@pytest.mark.parametrize("script", ["ling-operator", "ling-runtime"])
def test_console_script_is_installed_and_answers_help(script: str) -> None:
    exe = SCRIPTS / script
    assert exe.is_file(), f"{exe} is missing: run `make setup`"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean_on_the_repository(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *args, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"ruff {' '.join(args)} found problems:\n{proc.stdout}\n{proc.stderr}"
