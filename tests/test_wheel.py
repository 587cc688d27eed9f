"""The wheel a user installs: one top-level name, every package, and `tally demo` working
from a fresh virtualenv outside the checkout (its definitions and its broker launcher are
package code, not files of the repository)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from consumer_util import child_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (whl,) = out.glob("tally_aggregates-*.whl")
    return whl


def test_the_wheel_installs_one_top_level_name_and_every_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tally"}
    # Every folder with an __init__.py in the checkout is in the wheel, and its py.typed.
    for pkg in ("engine", "schemas", "consumers"):
        for init in (ROOT / pkg).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            assert f"tally/{rel}" in names, (
                f"{rel} is not in the wheel: list its package in pyproject.toml"
            )
        assert f"tally/{pkg}/py.typed" in names
    assert "tally/consumers/demo/leaderboard.py" in names
    assert "tally/consumers/demo/broker.py" in names
    assert not any(n.startswith("tally/__init__") for n in names)  # a namespace, nothing to shadow
    dist_info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(dist_info).decode()
    assert "Name: tally-aggregates" in meta
    assert "Provides-Extra: postgres" in meta


def test_tally_demo_runs_from_the_wheel_outside_the_checkout(
    wheel: Path, tmp_path: Path, kafka_bootstrap: str
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # The runtime dependencies, pinned and hashed as the checkout installs them.
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--require-hashes",
            "--no-deps",
            "-r",
            str(ROOT / "requirements.lock"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH",)}
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import tally.consumers.demo as d, tally.engine as e; print(d.__file__); print(e.__file__)",
        ],
        cwd=away,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert all(str(venv) in w for w in where), where  # the installed copy, not the checkout
    version = subprocess.run(
        [str(venv / "bin" / "tally"), "--version"],
        cwd=away,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and "tally-aggregates" in version.stdout
    res = subprocess.run(
        [
            str(venv / "bin" / "tally"),
            "demo",
            "--short",
            "--no-http",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            f"wheel-demo-{os.getpid()}",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=away,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "verified" in (res.stdout + res.stderr).lower()
    mod = subprocess.run(
        [str(py), "-m", "tally.consumers", "--help"],
        cwd=away,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert mod.returncode == 0 and "usage: tally" in mod.stdout
