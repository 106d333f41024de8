"""Every install is the pinned one (issue 26): the README's two commands and CI install from the lock files,
and the locks pin every package that requirements*.txt asks for, at a version it allows (a requirement added
without re-running scripts/lock.sh fails here)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"requirements.txt": "requirements.lock", "requirements-dev.txt": "requirements-dev.lock"}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def requirements(path: Path) -> list[Requirement]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out += requirements(path.parent / line[3:].strip())
        elif not line.startswith("-"):
            out.append(Requirement(line))
    return out


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        out[canonicalize_name(match[1])] = match[2]
    return out


def test_readme_gives_two_commands_both_installing_a_lock():
    commands = readme_commands()
    assert len(commands) == 2, commands
    app, tests = commands
    assert app == "python3.11 -m venv .venv && .venv/bin/pip install -r requirements.lock && .venv/bin/streamlit run app.py"
    assert tests == ("python3.11 -m venv .venv && .venv/bin/pip install -r requirements-dev.lock "
                     "&& .venv/bin/python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize("source", sorted(LOCKS))
def test_lock_pins_every_requirement_at_an_allowed_version(source):
    pinned = pins(ROOT / LOCKS[source])
    for requirement in requirements(ROOT / source):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in {LOCKS[source]}: run scripts/lock.sh"
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"{LOCKS[source]} pins {requirement.name}=={pinned[name]}, {source} asks {requirement.specifier}: run scripts/lock.sh"


def test_tests_install_the_apps_exact_versions():
    app, dev = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-dev.lock")
    assert {name: dev.get(name) for name in app} == app
