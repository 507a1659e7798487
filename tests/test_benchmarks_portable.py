"""Benchmarks name no machine's absolute paths: the shared harness is ../shared/bench from the
repository's root, and the anchors' Python is found or named, never assumed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _maml_speed():
    spec = importlib.util.spec_from_file_location("maml_speed", ROOT / "benchmarks" / "maml_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_no_benchmark_names_an_absolute_path_of_one_machine(script):
    found = re.findall(r"""["'](/(?:work|tmp|home|root|Users)/[^"']*)["']""", script.read_text())
    assert not found, f"{script.name} names {found}"


def test_the_harness_is_found_beside_the_repository_and_a_missing_anchor_python_is_one_clear_line(tmp_path):
    bench = _maml_speed()
    assert bench.HARNESS == ROOT.parent / "shared" / "bench" / "anchor_speed.py"
    (tmp_path / "setup_venv.sh").write_text('set -e\nVENV=${1:-%s}\npython3 -m venv "$VENV"\n' % (tmp_path / "venv"))
    assert bench.setup_script_venv(tmp_path) == tmp_path / "venv"
    with pytest.raises(SystemExit, match=r"no Python for the anchors found \(tried .*venv/bin/python\); make one "
                                         r"with `bash .*setup_venv.sh DIR`, then pass --anchor-python"):
        bench.find_anchor_python(None, bench=tmp_path)
    with pytest.raises(SystemExit, match="cannot import learn2learn, higher, torchopt"):
        bench.find_anchor_python(sys.executable, bench=tmp_path)  # this venv has no anchors
