"""Helpers for requirements.lock, shared by scripts/lock, scripts/setup and scripts/test-latest.

Standard library only (it runs before any venv exists). Subcommands:

- ``compile-args``: the ``--extra``/``--group`` flags that make the lock cover every extra
  and every dependency group declared in pyproject.toml (so a new group is locked without
  editing scripts/lock).
- ``latest-args``: the pip arguments scripts/test-latest installs with (the same extras and
  groups, without the lock).
- ``check-build``: every ``[build-system].requires`` entry is also in the ``build`` group,
  so the lock pins the build backend that ``pip install --no-build-isolation -e .`` uses.
- ``mark``: write the digest of pyproject.toml's dependency declarations into the lock.
- ``check``: fail, saying to run scripts/lock, when pyproject.toml declares other
  dependencies than the lock was compiled from (a stale lock would silently lack a new one).
- ``stamp``: the digest scripts/setup keeps in .venv to know the venv is up to date.
- ``sync`` (run by the venv's python): uninstall what the lock does not name and check that
  every installed distribution has a locked version, so the venv is exactly the lock.
- ``versions`` (run by the venv's python): the installed version of each direct dependency
  next to its locked one.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
MARK = "# pyproject.toml dependencies sha256: "


def _project_name() -> str:
    with PYPROJECT.open("rb") as f:
        return re.sub(r"[-_.]+", "-", tomllib.load(f)["project"]["name"]).lower()


PROJECT = _project_name()
"""This project's distribution (normalized), read from pyproject.toml."""
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalized project name (``Foo_Bar`` → ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def inputs_digest() -> str:
    """sha256 of every pyproject.toml declaration the lock is compiled from."""
    data = _pyproject()
    project = data.get("project", {})
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "dependency-groups": data.get("dependency-groups", {}),
        "build-system.requires": data.get("build-system", {}).get("requires", []),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def pins(lock: Path = LOCK) -> dict[str, set[str]]:
    """Locked versions by canonical name (a universal lock may pin two, under markers)."""
    out: dict[str, set[str]] = {}
    for line in lock.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            out.setdefault(canonical(m.group(1)), set()).add(m.group(2))
    return out


def compile_args() -> list[str]:
    """``--extra``/``--group`` flags for every extra and dependency group in pyproject.toml."""
    data = _pyproject()
    args: list[str] = []
    for extra in data.get("project", {}).get("optional-dependencies", {}):
        args += ["--extra", extra]
    for group in data.get("dependency-groups", {}):
        args += ["--group", group]
    return args


def latest_args() -> list[str]:
    """pip arguments installing tally editable with every extra and every dependency group."""
    data = _pyproject()
    extras = ",".join(data.get("project", {}).get("optional-dependencies", {}))
    args = ["-e", f".[{extras}]" if extras else "."]
    for group in data.get("dependency-groups", {}):
        args += ["--group", group]
    return args


def check_build() -> None:
    """Exit 1 unless the ``build`` group repeats every ``[build-system].requires`` entry."""
    data = _pyproject()
    requires = data.get("build-system", {}).get("requires", [])
    group = data.get("dependency-groups", {}).get("build", [])
    missing = [r for r in requires if r not in group]
    if missing:
        sys.exit(
            f"lock: [build-system].requires has {missing}, which the 'build' dependency group "
            "lacks; add them there (scripts/setup builds tally from the locked build group)"
        )


def mark(lock: Path = LOCK) -> None:
    """Put the pyproject inputs digest on the lock's first line (replacing an older one)."""
    lines = [ln for ln in lock.read_text().splitlines() if not ln.startswith(MARK)]
    lock.write_text("\n".join([MARK + inputs_digest(), *lines]) + "\n")


def check(lock: Path = LOCK) -> None:
    """Exit 1 with the fix when the lock is missing or was compiled from other inputs."""
    if not lock.exists():
        sys.exit(f"setup: {lock.name} is missing; run scripts/lock to create it")
    first = lock.read_text().partition("\n")[0]
    if first != MARK + inputs_digest():
        sys.exit(
            f"setup: {lock.name} is out of date: pyproject.toml now declares other "
            "dependencies (or extras, groups, build requirements, requires-python) than it "
            "was compiled from. Run scripts/lock (it keeps the existing pins) and commit "
            f"{lock.name} together with pyproject.toml."
        )


def stamp() -> str:
    """Digest of everything a .venv install depends on: lock, pyproject and these scripts."""
    h = hashlib.sha256()
    for path in (LOCK, PYPROJECT, ROOT / "scripts" / "setup", Path(__file__).resolve()):
        h.update(path.name.encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
    return h.hexdigest()


def _installed() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[canonical(name)] = dist.version
    return out


def sync(lock: Path = LOCK) -> None:
    """Make the running interpreter's environment hold exactly the lock (plus tally)."""
    locked = pins(lock)
    extra = sorted(n for n in _installed() if n not in locked and n != PROJECT)
    if extra:
        print(f"setup: removing packages the lock does not name: {', '.join(extra)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra], check=True)
    installed = _installed()
    wrong = [
        f"{n}=={v} (locked: {' or '.join(sorted(locked[n]))})"
        for n, v in sorted(installed.items())
        if n != PROJECT and v not in locked.get(n, set())
    ]
    if wrong:
        sys.exit(f"setup: installed versions differ from {lock.name}: {', '.join(wrong)}")
    if PROJECT not in installed:
        sys.exit("setup: tally itself is not installed in the venv")
    print(f"setup: .venv holds the {len(installed) - 1} packages pinned in {lock.name}, and tally")


def versions(lock: Path = LOCK) -> None:
    """Print each direct dependency's installed version, marking those that left the lock."""
    data = _pyproject()
    project = data.get("project", {})
    specs: list[str] = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    for group in data.get("dependency-groups", {}).values():
        specs += [s for s in group if isinstance(s, str)]
    names = sorted({canonical(m.group(1)) for s in specs if (m := _NAME.match(s))})
    locked = pins(lock) if lock.exists() else {}
    installed = _installed()
    rows: list[str] = []
    moved = 0
    for name in names:
        have = installed.get(name, "not installed")
        was = " or ".join(sorted(locked.get(name, set()))) or "not locked"
        note = ""
        if have not in locked.get(name, set()):
            moved += 1
            note = f"   <- {lock.name} has {was}"
        rows.append(f"  {name:<20} {have}{note}")
    print(
        f"test-latest: direct dependencies, newest allowed ({moved} of {len(names)} "
        f"differ from {lock.name}):",
        *rows,
        sep="\n",
    )


def main(argv: list[str]) -> None:
    """Dispatch the subcommand named by ``argv[0]``."""
    cmd = argv[0] if argv else ""
    if cmd == "compile-args":
        print("\n".join(compile_args()))
    elif cmd == "latest-args":
        print("\n".join(latest_args()))
    elif cmd == "check-build":
        check_build()
    elif cmd == "mark":
        mark()
    elif cmd == "check":
        check()
    elif cmd == "stamp":
        print(stamp())
    elif cmd == "sync":
        sync()
    elif cmd == "versions":
        versions()
    else:
        sys.exit(
            "usage: lockutil.py compile-args|latest-args|check-build|mark|check|stamp|sync|versions"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
