"""A rank killed by SIGKILL under torchrun --max-restarts (issue 12, item 12): torchrun starts the
job again by itself, the new rank 0 takes the output lock again, and training resumes from the
latest complete checkpoint, logging the same losses as a run that was never interrupted.

Two gloo ranks on the CPU, the command line the pipeline gives a training stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_train_loop import data, losses, overrides  # noqa: E402,F401 - `data`: the same small shards and pool

from insclr.pipeline.commands import launch_env, launcher  # noqa: E402
from insclr.pipeline.recipe import Stage  # noqa: E402

STEPS = 8  # checkpoints at 3, 6 and 8
pytestmark = pytest.mark.cross_check


def start(data, out, log):
    """The pipeline's training command (torchrun, 2 ranks, --max-restarts=2) in a fresh process."""
    stage = Stage("s1", "train", {})
    argv = launcher(stage, nproc=2, max_restarts=2)
    argv += ["-m", "insclr.train", str(HERE.parent / "configs" / "demo.yaml"), *overrides(data, out, STEPS)]
    assert "--max-restarts=2" in argv
    env = {**os.environ, **launch_env(stage), "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def worker_of_rank(torchrun, rank):
    """The pid of the worker of `torchrun` whose RANK is `rank` (Linux /proc), or None."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if parent == torchrun and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def finish(proc, log, timeout=400):
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return log.read_text()


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_restarts_and_resumes_from_the_latest_checkpoint(data, tmp_path):
    with open(tmp_path / "a.log", "w") as log:
        whole = start(data, tmp_path / "a", log)  # the reference, never interrupted
    with open(tmp_path / "b.log", "w") as log:
        proc = start(data, tmp_path / "b", log)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "b" / "ckpt" / "step-00000003").is_dir():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(0.05)
        victim = worker_of_rank(proc.pid, 1)
        os.kill(victim, signal.SIGKILL)  # one rank dies with no chance to clean up
        out = finish(proc, tmp_path / "b.log")
        finish(whole, tmp_path / "a.log")
    finally:
        for p in (proc, whole):
            if p.poll() is None:
                p.kill()
    assert "failed (exitcode: -9) local_rank: 1" in out  # torchrun saw the kill, then started the group again
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "/ckpt/step-0000000" in resumed[0], resumed
    step = int(resumed[0].rsplit("(step ", 1)[1].rstrip(")"))
    assert step in (3, 6)  # a complete checkpoint (the latest when the job restarted)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _, _ in b] == list(range(1, STEPS + 1))  # each step logged once
    # resumed exactly, equal by construction: two ranks with one thread each on both sides, and the
    # checkpoint holds the same per-rank RNG, sampler and bank states
    assert a == b
    assert (tmp_path / "b" / "model.pt").is_file()
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == STEPS
