"""benchmarks/gpu_check.sh as far as a machine without a GPU can take it.

* ``bash -n``: the script parses;
* ``--dry-run`` prints the plan, naming every part, and runs nothing;
* a real run here stops at the preflight with the no-GPU message and exit status 3, after
  checking the Python, and writes the report saying so;
* bad arguments exit 2, a Python that does not exist exits 4;
* ``--collect``: every test group of the GPU run still selects tests (a renamed test would
  otherwise only show up on a GPU machine, as a group that selects nothing).

The script runs with this interpreter's folder first on PATH, as ``python3``, so that it
finds the same torch as the tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ["preflight", "install", "build", "test:sync-free", "test:cuda-graph", "test:cuda",
         "test:triton", "test:kron+class-head", "test:compile", "benchmark"]
EXIT_NO_GPU = 3

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str, out_dir: Path | None = None, timeout: float = 120, **env):
    full_env = dict(os.environ)
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    full_env.pop("PYTHON", None)
    full_env.pop("OUT", None)
    if out_dir is not None:
        full_env["OUT"] = str(out_dir)
    full_env.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def test_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_dry_run_names_every_part_and_runs_nothing(tmp_path):
    out = _run("--dry-run", out_dir=tmp_path / "out")
    assert out.returncode == 0, out.stdout + out.stderr
    for part in PARTS:
        assert part in out.stdout, f"the plan does not name {part!r}:\n{out.stdout}"
    for command in ("pip install -v --no-index --no-build-isolation --no-deps -e .",
                    "-m benchmarks.gpu", "--quick", "-m pytest"):
        assert command in out.stdout, command
    assert "Exit status" in out.stdout and "3 no CUDA GPU visible" in out.stdout
    assert not (tmp_path / "out").exists(), "--dry-run created the output folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script "
                                                      "runs the real check here")
def test_without_a_gpu_it_says_so_and_exits_3(tmp_path):
    out = _run(out_dir=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == EXIT_NO_GPU, text
    assert "no CUDA GPU visible: the GPU check needs one NVIDIA GPU; nothing was run" in text
    # the Python was still checked: its torch, and the tools a GPU run needs
    assert f"torch {torch.__version__}" in text
    assert "pytest" in text and "triton" in text
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "no_gpu" and report["exit_code"] == EXIT_NO_GPU
    assert report["environment"]["torch"] == torch.__version__
    assert report["environment"]["gpu_count"] == 0
    results = {p["part"]: p["result"] for p in report["parts"]}
    assert results == {"preflight": "PASS", **{p: "SKIP" for p in PARTS[1:]}}, results
    assert "no_gpu" in (tmp_path / "gpu_check.md").read_text()
    assert (tmp_path / "gpu_check.log").read_text().count("no CUDA GPU visible") >= 1
    assert not (tmp_path / "install.log").exists(), "something was installed without a GPU"


def test_bad_arguments_exit_2_and_a_missing_python_exits_4(tmp_path):
    out = _run("--no-such-flag", out_dir=tmp_path)
    assert out.returncode == 2 and "unknown argument" in out.stderr
    out = _run("--budget", "10", out_dir=tmp_path)
    assert out.returncode == 2 and "budget" in out.stderr
    out = _run("--python", str(tmp_path / "no-python"), out_dir=tmp_path)
    assert out.returncode == 4 and "set PYTHON" in out.stderr


def test_every_test_group_selects_tests():
    out = _run("--collect", timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for part in PARTS:
        if part.startswith("test:"):
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith(part + " ")), "")
            assert "selects" in line and "NOTHING" not in line, text
