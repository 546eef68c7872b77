"""The base install (`pip install .`, no extras) into a fresh virtual environment: the API stubs import,
no server dependency comes along, and its `copl` names the server extra instead of failing on import.
Uses the package registry (about 15-25 s on 2 cores)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_tree(dest: Path) -> Path:
    """The project's files without the developer's build outputs (.venv, *.egg-info), so the install
    builds from the sources alone and writes nothing into the checkout."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        for name in listed.stdout.splitlines():
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # not a git checkout (an unpacked sdist)
        shutil.copytree(ROOT, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".venv", "*.egg-info", "build", "data", "__pycache__"))
    return dest


def test_base_install_has_the_api_and_a_copl_that_names_the_server_extra(tmp_path):
    src = _source_tree(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(src)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]

    proc = subprocess.run([str(venv / "bin" / "copl"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'copl[server]'" in lines[0] and "typer" in lines[0], proc.stderr

    check = ("import importlib.util, copl.v1.graph_pb2, copl.v1.reward_pb2_grpc; "
             "print([m for m in ('torch', 'typer', 'sqlalchemy', 'ray') if importlib.util.find_spec(m)])")
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # the client install brings none of the server's dependencies
