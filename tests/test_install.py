"""The package as a user installs it: a wheel (not this checkout) in a fresh virtual environment
that reuses the dependencies already installed here, driven from an empty working directory."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
BUILD_IGNORE = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__",
                                      "demo_out", "science_out", "runs", ".pytest_cache")
HEAVY = ("torch", "deepspeed", "timm", "torchvision")


def clean_env() -> dict[str, str]:
    """No PYTHONPATH: the venv must find the installed wheel, not a checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("install")
    # Build from a copy, so that no stale build/ folder of the checkout can leak into the wheel.
    source = work / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=BUILD_IGNORE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
                   check=True, env=clean_env(), timeout=300)
    wheel = next((work / "dist").glob("mokd_scale-*.whl"))
    env_dir = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies: this environment's site-packages, visible to the new one through a .pth file.
    Path(venv_site, "shared-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --no-index: every requirement must already be met by the installed versions (the ranges hold).
    subprocess.run([*pip, "--python", str(python), "install", "--no-index", str(wheel)], check=True,
                   env=clean_env(), timeout=300)
    return env_dir


def test_wheel_carries_recipes_and_deepspeed_configs(venv):
    code = ("import mokd_scale, pathlib; p = pathlib.Path(mokd_scale.__file__).parent; print(p); "
            "print(sorted(f.name for f in (p / 'ds_configs').glob('*.json'))); "
            "print(sorted(f.name for f in (p / 'config' / 'recipes').glob('*.yaml')))")
    lines = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True,
                           env=clean_env(), cwd=venv).stdout.splitlines()
    assert Path(lines[0]).is_relative_to(venv)  # the installed copy, not the checkout
    assert lines[1] == str(sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
    assert "tiny_cpu.yaml" in lines[2]


HELP_PROBE = """
import sys
from importlib.metadata import distribution
if sys.argv[1] == "--list":
    print(" ".join(ep.name for ep in distribution("mokd_scale").entry_points if ep.group == "console_scripts"))
    sys.exit(0)
ep = next(ep for ep in distribution("mokd_scale").entry_points if ep.name == sys.argv[1])
sys.argv = [ep.name, "--help"]
try:
    code = ep.load()()
except SystemExit as exit:
    code = exit.code
print(code or 0, " ".join(m for m in HEAVY if m in sys.modules))
"""


def test_every_console_script_answers_help_without_importing_heavy_libraries(venv):
    def probe(*args: str) -> str:
        done = subprocess.run([str(venv / "bin" / "python"), "-c", f"HEAVY = {HEAVY!r}\n{HELP_PROBE}", *args],
                              capture_output=True, text=True, env=clean_env(), cwd=venv, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.splitlines()[-1]

    names = probe("--list").split()
    assert set(names) == {"mokd-train", "mokd-shards", "mokd-eval-knn", "mokd-eval-linear", "mokd-export",
                          "mokd-bench", "mokd-demo", "mokd-fashion-mnist", "mokd-plot", "mokd-visualize"}
    results = {name: probe(name).split() for name in names}
    assert all(result[0] == "0" for result in results.values()), results
    assert {name: r[1:] for name, r in results.items() if r[1:]} == {}
    for name in names:  # the installed executables themselves
        assert subprocess.run([str(venv / "bin" / name), "--help"], capture_output=True, env=clean_env(),
                              timeout=120).returncode == 0, name


def test_installed_package_trains_two_steps_from_an_empty_folder(venv, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    done = subprocess.run([str(venv / "bin" / "mokd-train"), "--config", "tiny_cpu", "--resume", "none", "--set",
                           "train.steps=2", "data.source=synthetic", "data.workers=0", "--out", "run"],
                          capture_output=True, text=True, env=clean_env(), cwd=work, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (work / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # no ds_configs/ needed next to the run
