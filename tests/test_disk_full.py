"""A write that runs out of room (issue 12, item 9): an error that says so and names the file, no
temporary file left behind, the previous file intact, for every kind of output.

The room runs out for real, without root: the writer runs in a subprocess whose RLIMIT_FSIZE is
small and which ignores SIGXFSZ, so the kernel fails the write(2) that passes the limit with
EFBIG, the same OSError path (from the same system call) as ENOSPC on a full disk. Where an
unprivileged user namespace can mount a tmpfs (`unshare -rm`), one more test fills a real small
file system and sees ENOSPC itself; it skips elsewhere.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
LIMIT = 256 << 10  # bytes any one file of the writer may reach


def _limited(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the failed write returns EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_limited(args, limit=LIMIT, **kw):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "INSCLR_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limited(limit), **kw)


# Each writer first writes a small file (it fits), then a large one over it (it does not).
WRITERS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from insclr.io import DiskFull, save_npy, save_npz, write_json
    from insclr.model import save_model

    out = Path(sys.argv[1])
    writers = {"features": lambda p, n: save_npy(p, np.ones((n, 4), np.float32)),
               "pool": lambda p, n: save_npz(p, neighbors=np.zeros((n, 4), np.int64), similarities=np.ones((n, 4))),
               "model": lambda p, n: save_model(torch.nn.Linear(n, 4), {}, p),
               "json": lambda p, n: write_json(p, {"rows": list(range(n))})}
    for kind, write in writers.items():
        path = out / ("output." + kind)
        write(path, 10)
        try:
            write(path, 1 << 16)
            print(json.dumps({"kind": kind, "error": None}))
        except DiskFull as e:
            print(json.dumps({"kind": kind, "error": str(e), "errno": e.errno}))
""")
KINDS = ["features", "pool", "model", "json"]


def check_writers(out, stdout, message):
    """Each writer's report says `message` and names its file; only the previous files are left, intact."""
    reports = [json.loads(line) for line in stdout.splitlines()[:len(KINDS)]]
    assert [r["kind"] for r in reports] == KINDS
    for r in reports:
        assert (r["error"] or "").startswith(f"{message}: cannot write {out / ('output.' + r['kind'])}"), r
    return reports


def test_atomic_writes_report_a_full_disk_and_keep_the_previous_file(tmp_path):
    script = tmp_path / "writers.py"
    script.write_text(WRITERS)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_limited([str(script), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_writers(out, proc.stdout, "file size limit exceeded")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"output.{k}" for k in KINDS)  # no .tmp left
    assert np.load(out / "output.features").shape == (10, 4)  # the previous files, intact
    assert json.loads((out / "output.json").read_text()) == {"rows": list(range(10))}
    import torch

    assert torch.load(out / "output.model")["model"]["weight"].shape == (4, 10)


def test_pool_command_says_the_disk_is_full_in_one_line(tmp_path):
    features = tmp_path / "features.npy"
    rng = np.random.default_rng(0)
    np.save(features, rng.standard_normal((600, 64)).astype(np.float32))
    out = tmp_path / "pool.npz"
    first = run_limited(["-m", "insclr.pool", "--features", str(features), "--out", str(out), "--k", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = out.read_bytes()
    proc = run_limited(["-m", "insclr.pool", "--features", str(features), "--out", str(out), "--k", "100"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: file size limit exceeded: cannot write {out}")
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


SHARD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from insclr.io import DiskFull
    from insclr.shard.writer import ShardWriter

    stem, size = Path(sys.argv[1]), int(sys.argv[2])
    try:
        with ShardWriter(stem) as w:
            for i in range(8):
                w.write(f"{i:09d}", {"jpg": bytes([i]) * size, "json": b"{}"})
    except DiskFull as e:
        print(json.dumps({"error": str(e)}))
""")


@pytest.mark.parametrize("sample_bytes", [40 << 10, 200 << 10])  # fails when the tar is closed / mid-write
def test_shard_writer_reports_a_full_disk_and_leaves_no_temporary_file(tmp_path, sample_bytes):
    script = tmp_path / "shard.py"
    script.write_text(SHARD)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "part-000000.tar").write_bytes(b"complete shard")  # an earlier shard: must stay as it is
    proc = run_limited([str(script), str(out / "part-000001"), str(sample_bytes)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["error"].startswith(f"file size limit exceeded: cannot write {out / 'part-000001.tar'}")
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.tar"]
    assert (out / "part-000000.tar").read_bytes() == b"complete shard"


CHECKPOINT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from insclr.config import load_config
    from insclr.io import DiskFull
    from insclr.train import checkpoint

    out, config = Path(sys.argv[1]), sys.argv[2]
    cfg = load_config(config, [])
    checkpoint.save(out, 1, {"w": torch.ones(4)}, {}, {"rng": torch.ones(2)}, cfg)
    try:
        checkpoint.save(out, 2, {"w": torch.ones(1 << 17)}, {}, {"rng": torch.ones(2)}, cfg)
    except DiskFull as e:
        print(json.dumps({"error": str(e)}))
""")


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    script = tmp_path / "ckpt.py"
    script.write_text(CHECKPOINT)
    out = tmp_path / "run"
    proc = run_limited([str(script), str(out), str(HERE.parent / "configs" / "demo.yaml")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["error"].startswith("file size limit exceeded: cannot write " + str(out / "ckpt"))
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step-00000001"]  # no .tmp-step-00000002
    import torch

    assert torch.equal(torch.load(out / "ckpt" / "step-00000001" / "state.pt")["w"], torch.ones(4))


def _can_mount_tmpfs():
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged user namespace to mount a small tmpfs in")
def test_a_really_full_file_system_says_disk_full(tmp_path):
    script = tmp_path / "writers.py"
    script.write_text(WRITERS)
    mount = tmp_path / "small"
    mount.mkdir()
    # A 256 KiB tmpfs in a private mount namespace (gone when the command ends): the small files
    # fit, each large one fills it and is removed again.
    command = f"mount -t tmpfs -o size=256k tmpfs {mount} && {sys.executable} {script} {mount} && ls -A {mount}"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = check_writers(mount, proc.stdout, "disk full")
    assert {r["errno"] for r in reports} == {28}  # ENOSPC
    assert sorted(proc.stdout.splitlines()[len(KINDS):]) == sorted(f"output.{k}" for k in KINDS)  # no .tmp
