"""The package as a user installs it: a wheel built from the checkout, installed outside it, runs
every command's --help and the smallest run of every benchmark suite (issue 11). Nothing under
insclr/ may reach into tests/ or the source tree: what a command needs ships in the package.

The wheel is installed with `pip install --no-deps --target` (its dependencies, torch included,
come from the running interpreter's environment) and run with only that folder on PYTHONPATH, from
a folder outside the checkout; the test checks that `insclr` is imported from there."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["insclr.train", "insclr.evaluate", "insclr.shard", "insclr.synth", "insclr.pipeline",
            "insclr.demo", "insclr.download", "insclr.features", "insclr.pool", "insclr.bench", "insclr.whiten",
            "insclr.search", "insclr.export", "insclr.plot"]
# the smallest run of each suite (python -m insclr.bench --help lists them)
SUITES = {
    "shard": ["--scale", "tiny", "--times", "1"],
    "loader": ["--images", "8", "--width", "64", "--height", "48", "--batch", "1", "--k", "1", "--size", "32",
               "--noaug", "0", "--threads", "1", "--steps", "1"],
    "extract": ["--images", "8", "--arch", "resnet18", "--size", "32", "--scales", "1", "--batch", "4",
                "--threads", "1"],
    "pool": ["--n", "200", "--dim", "8", "--queries", "10", "--k", "5"],
    "train": ["--mining-n", "400", "--mining-get-size", "100", "--mining-dim", "8", "--anchors", "1", "--k", "1",
              "--size", "32", "--arch", "resnet18"],
    "evaluate": ["--n", "200", "--dim", "8", "--queries", "5", "--baseline-repeats", "1", "--device", "cpu"],
    "search": ["--n", "500", "--dim", "16", "--queries", "10", "--clusters", "10"],
    "rerank": ["--n", "300", "--dim", "8", "--queries", "5", "--cluster", "20", "--device", "cpu", "--quality"],
    "loop": ["--images", "80", "--steps", "1", "--warmup", "1", "--size", "32", "--noaug-size", "40", "--min-side", "96",
             "--max-side", "128", "--threads", "1", "--arch", "resnet18", "--device", "cpu"],
    "pool-memory": ["--n", "4000", "--k", "40", "--baseline-n", "2000"],
}
# suites whose smallest run needs more than the package: their --help runs from the wheel instead
HELP_ONLY = {
    "fidelity": "makes the synthetic demo set first (minutes); tests/test_bench_fidelity.py runs its pieces",
    "parity": "needs a developer's checkout of the original InsCLR code (--original PATH)",
}


def test_every_bench_suite_is_run_from_the_wheel():
    from insclr.bench import SUITES as ALL

    assert set(SUITES) | set(HELP_ONLY) == set(ALL) and not set(SUITES) & set(HELP_ONLY)


# modules that import a developer's checkout of the original InsCLR code, given on the command line
IMPORTS_A_GIVEN_CHECKOUT = {"insclr/bench/original_eval.py": "sys.path.insert(0, str(original))",
                            "insclr/bench/parity/launch_original.py": "sys.path.insert(0, str(Path(original).resolve()))"}


def test_package_reaches_nowhere_outside_itself():
    """No module under insclr/ puts a folder on sys.path (except the --original checkout a developer
    names) or names tests/ as a place to read."""
    for path in (ROOT / "insclr").rglob("*.py"):
        text = path.read_text()
        allowed = IMPORTS_A_GIVEN_CHECKOUT.get(path.relative_to(ROOT).as_posix())
        if allowed:
            text = text.replace(allowed, "")
        assert not re.search(r"sys\.path\.(insert|append)", text), path
        assert not re.search(r"""["']tests["']|/ *["']tests""", text), path


def run(argv, env, cwd, timeout=300):
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(env, cwd) running the wheel's insclr from a folder outside the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so that the build's build/ and egg-info stay out of the checkout
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "insclr", src / "insclr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", INSCLR_NO_PROGRESS="1")
    pip = [sys.executable, "-m", "pip", "-q"]
    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", str(tmp / "dist"), str(src)],
        env, tmp)
    (wheel,) = (tmp / "dist").glob("insclr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "insclr/bench/reference_insclr.py" in names and not any(n.startswith("tests/") for n in names)
    run(pip + ["install", "--no-deps", "--no-compile", "--target", str(tmp / "site"), str(wheel)], env, tmp)
    env["PYTHONPATH"] = str(tmp / "site")
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    where = run([sys.executable, "-c", "import insclr; print(insclr.__file__)"], env, cwd).strip()
    assert Path(where).is_relative_to(tmp / "site"), where  # not the checkout's insclr
    return env, cwd


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_installed_command_help(installed, command):
    env, cwd = installed
    proc = subprocess.run([sys.executable, "-m", command, "--help"], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "usage" in proc.stdout + proc.stderr, (proc.stdout[-2000:], proc.stderr[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_installed_bench_suite_smallest_run(installed, suite):
    env, cwd = installed
    out = cwd / f"{suite}.json"
    run([sys.executable, "-m", "insclr.bench", suite, "--repeats", "1", *SUITES[suite], "--json", str(out)], env, cwd)
    assert "ratio" in json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted(HELP_ONLY))
def test_installed_bench_suite_help(installed, suite):
    env, cwd = installed
    assert "usage" in run([sys.executable, "-m", "insclr.bench", suite, "--help"], env, cwd)
