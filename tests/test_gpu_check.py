"""scripts/gpu_check.sh, checked without a GPU: it parses, its dry run lists every step within the lease's 8 minutes,
and every command it would run takes the arguments it is given (so a renamed flag fails here, not on the lease)."""

from __future__ import annotations

import re
import shlex
import subprocess

from test_bench import REPO, bench_script

from quietstar.training import parse_config

SCRIPT = REPO / "scripts" / "gpu_check.sh"
LEASE_SECONDS = 8 * 60


def dry_run(tmp_path) -> list[tuple[int, list[str]]]:
    """(time limit, command) of every step the script would run."""
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    steps = re.findall(r"^\s+\[\s*(\d+)s\] (.*) > \S+$", result.stdout, flags=re.MULTILINE)
    return [(int(limit), shlex.split(command)) for limit, command in steps]


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_lists_every_step_within_the_lease(tmp_path):
    steps = dry_run(tmp_path)
    commands = [" ".join(command) for _, command in steps]
    assert sum(limit for limit, _ in steps) < LEASE_SECONDS
    for part in ("tests/test_flex.py", "-m gpu", "bench/sus.py", "scripts/train.py"):
        assert any(part in command for command in commands), part
    backends = [command[command.index("--attention-backend") + 1] for _, command in steps if "--attention-backend" in command]
    assert sorted(backends) == ["eager", "flex", "triton"]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_every_command_takes_its_arguments(tmp_path):
    for _, command in dry_run(tmp_path):
        script, args = command[1], command[2:]
        if script.startswith("bench/"):
            module = bench_script(script.removeprefix("bench/").removesuffix(".py"))
            module.parse_args([arg if arg != "cuda" else "cpu" for arg in args])  # no CUDA here
        elif script == "scripts/train.py":
            parse_config([*args, "--bf16", "false"])  # bf16 needs the GPU
