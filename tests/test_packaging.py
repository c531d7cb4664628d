"""The installed package stands alone: installed (not editable) into a fresh virtual environment, every console
script runs outside the checkout; and the checkout's README commands, now thin wrappers, still run from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each command and an option only its own --help lists: the script runs the right command.
COMMANDS = {"quietstar-train": "--thought_curriculum", "quietstar-eval": "--protocol",
            "quietstar-generate": "--show-thoughts", "quietstar-export": "--merge-lora",
            "quietstar-report": "--heldout-documents", "quietstar-lm-eval": "--model_args"}


def clean_env() -> dict:
    """This environment without anything that would put the checkout on ``sys.path``."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def run(command: list, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment with quietstar installed from a copy of what a source distribution holds.

    No network: the environment sees this interpreter's packages (torch, transformers, pip, setuptools, ...)
    through a ``.pth`` line naming their folder. A folder added that way is not a site folder, so the ``.pth``
    files in it (an editable install of a checkout) do not run: only the installed copy provides ``quietstar``.
    """
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(os.path.join(REPO, "quietstar"), source / "quietstar",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    env = root / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    with open(os.path.join(site, "project-packages.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    result = run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
                  source], root, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return env


@pytest.mark.slow  # installs the package and starts seven Python processes (~1 minute)
def test_the_installed_package_is_imported_and_registers_the_lm_eval_model(installed, tmp_path):
    code = ("import quietstar, lm_eval.api.registry as registry, quietstar.evaluation.lm_eval_model; "
            "print(quietstar.__file__); print(registry.get_model('quietstar').__module__)")
    result = run([installed / "bin" / "python", "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    path, module = result.stdout.split()
    assert os.path.realpath(path).startswith(os.path.realpath(installed)) and not path.startswith(REPO)
    assert module == "quietstar.evaluation.lm_eval_model"


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_console_script_runs_outside_the_checkout(installed, command, tmp_path):
    result = run([installed / "bin" / command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.lower().startswith("usage:") and COMMANDS[command] in result.stdout


@pytest.mark.slow  # three Python processes (~20 s)
@pytest.mark.parametrize("command,option", [(["eval/run.py"], "--protocol"),
                                            (["scripts/report.py"], "--heldout-documents"),
                                            (["-m", "eval.lm_eval_adapter"], "--model_args")])
def test_the_checkouts_commands_run_from_anywhere(command, option, tmp_path):
    """README commands the other tests do not start (scripts/train.py, generate.py and export.py run elsewhere)."""
    if command[0] == "-m":
        cwd, argv = REPO, [sys.executable, *command, "--help"]  # `python -m` runs from the repository root
    else:
        cwd, argv = tmp_path, [sys.executable, os.path.join(REPO, *command[0].split("/")), "--help"]
    result = run(argv, cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.lower().startswith("usage:") and option in result.stdout
