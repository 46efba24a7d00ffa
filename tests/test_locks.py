"""One writer per output (issue 12, item 2): every command that writes an output folder or file
refuses a second writer with one line naming the output and the holder's pid; a killed holder
never blocks the next run."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

from insclr.io import OutputLocked, output_lock  # noqa: E402

HOLDER = textwrap.dedent("""
    import sys, time
    from insclr.io import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """start(path): another process that holds the lock of `path` until the test ends; returns it."""
    procs = []

    def start(path):
        script = tmp_path / "holder.py"
        script.write_text(HOLDER)
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        proc = subprocess.Popen([sys.executable, str(script), str(path)], env=env, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "locked\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _refused(capsys, code, path, proc, expected_code=2):
    assert code == expected_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {Path(path).resolve()} is being written by another process (pid {proc.pid} on ")
    assert "Traceback" not in "\n".join(err)


def test_train_refuses_a_second_writer(tmp_path, holder, capsys):
    from insclr.train import main

    out = tmp_path / "run"
    proc = holder(out)
    _refused(capsys, main([str(HERE.parent / "configs" / "demo.yaml"), f"train.out={out}", "train.device=cpu"]),
             out, proc)
    assert not out.exists()  # nothing written


def test_features_and_pool_refuse_a_second_writer(tmp_path, holder, capsys):
    from insclr.features import main as features_main
    from insclr.pool import main as pool_main

    out = tmp_path / "features.npy"
    proc = holder(out)
    _refused(capsys, features_main(["--shards", str(tmp_path), "--model", "random", "--out", str(out)]), out, proc)
    out = tmp_path / "pool.npz"
    proc = holder(out)
    _refused(capsys, pool_main(["--features", str(tmp_path / "f.npy"), "--out", str(out)]), out, proc)


def test_shard_refuses_a_second_writer(tmp_path, holder, capsys):
    from insclr.shard.cli import main

    out = tmp_path / "shards"
    proc = holder(out)
    _refused(capsys, main(["folder", "--src", str(tmp_path), "--out", str(out)]), out, proc)


def test_a_killed_holder_releases_the_lock(tmp_path, holder):
    out = tmp_path / "out"
    proc = holder(out)
    with pytest.raises(OutputLocked):
        with output_lock(out):
            pass
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops its lock
    proc.wait()
    with output_lock(out):
        pass
    assert not out.exists()  # the lock file sits beside the output, not in it
    assert (tmp_path / ".out.lock").is_file()


def test_only_rank_zero_of_a_torchrun_job_takes_the_lock(tmp_path, holder, monkeypatch):
    out = tmp_path / "out"
    holder(out)
    monkeypatch.setenv("RANK", "1")  # the other ranks write under rank 0's direction
    with output_lock(out):
        pass
