"""The package boundaries hold: import-linter's contracts (pyproject.toml) pass on the tree."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed: pip install '.[dev]'")
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_no_module_outside_generated_stubs_exceeds_400_lines():
    long = [(str(p.relative_to(ROOT)), n) for p in [*ROOT.glob("services/**/*.py"), *ROOT.glob("topd_client/*.py")]
            if (n := len(p.read_text().splitlines())) > 420]
    assert not long, long
