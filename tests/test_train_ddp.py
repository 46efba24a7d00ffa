"""DDP semantics of the step: a 2-process gloo run equals one process on the same global batch,
and a NaN seen by one rank only is skipped by both."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_ddp_helper as helper  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(HERE / "train_ddp_helper.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(2)]
    single = helper.run(out / "single", scenarios=("v2_selection", "v1"))
    return two, single


def close(a, b, tol=2e-4):
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=tol, atol=tol) for k in a)


@pytest.mark.parametrize("scenario", ["v2_selection", "v1"])
def test_two_ranks_equal_one_process(runs, scenario):
    (r0, r1), single = (runs[0][0][scenario], runs[0][1][scenario]), runs[1][scenario]
    for key in ("loss", "batch_loss", "memory_loss"):
        assert [r[key] for r in r0["records"]] == [r[key] for r in r1["records"]]  # identical on every rank
        assert [r[key] for r in r0["records"]] == pytest.approx([r[key] for r in single["records"]], rel=1e-4)
    assert single["records"][-1]["memory_loss"] > 0  # the bank is really in use
    if scenario == "v2_selection":
        assert [r["selected"] for r in r0["records"]] == [r["selected"] for r in single["records"]]
        assert [r["mining_positives"] for r in r0["records"]] == [r["mining_positives"] for r in single["records"]]
    assert set(r0["bank"]) == set(single["bank"]) and all(torch.equal(r0["bank"][k], r1["bank"][k]) for k in r0["bank"])
    assert close(r0["bank"], single["bank"])
    assert [r["grad_norm"] for r in r0["records"]] == pytest.approx([r["grad_norm"] for r in single["records"]], rel=1e-3)
    # the summed per-rank gradients (loss × world, DDP averages) equal the single-process gradient
    g2, g1 = r0["grads"], single["grads"]
    assert set(g2) == set(g1) and len(g1) > 0
    scale = max(g.abs().max().item() for g in g1.values())
    assert all(torch.allclose(g2[k], g1[k], rtol=1e-3, atol=1e-4 * scale) for k in g1)
    assert close(r0["params"], r1["params"], tol=0)  # DDP keeps the replicas identical


def test_nan_on_one_rank_is_skipped_by_both(runs):
    r0, r1 = runs[0][0]["nan"]["records"], runs[0][1]["nan"]["records"]
    assert [r["skipped"] for r in r0] == [0, 1, 0] == [r["skipped"] for r in r1]
    assert r0[1]["nonfinite_total"] == r1[1]["nonfinite_total"] == 1
    assert r0[2]["loss"] == r1[2]["loss"] and r0[2]["loss"] == r0[2]["loss"]  # finite, same on both
    assert close(runs[0][0]["nan"]["params"], runs[0][1]["nan"]["params"], tol=0)
