"""DDP semantics of the step: a 2-process gloo run equals one process on the same global batch,
and a NaN seen by one rank only is skipped by both.

Two ranks and one process sum the same terms in different orders (each rank's half of the batch,
then the all-reduce), so they agree to rounding, not bit for bit, and Adam turns the rounding of
near-zero gradients into visible parameter differences within a few steps (docs/training.md, "Two
ranks and one process"). So every step of the 2-rank run starts from the one-process run's state
at that step (train_ddp_helper.run_scenario), and what it computes is compared to a tolerance
derived below; equality is asserted only where it holds by construction (between the replicas).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_ddp_helper as helper  # noqa: E402

pytestmark = pytest.mark.cross_check

# The unit roundoff of float32, and the longest sum whose order differs between two ranks and one
# process: the gradient of conv1's weights sums over the global batch's B·(K+1) rows times the
# (SIZE/2)² positions of its stride-2 output. Summing n terms in another order changes the result by
# at most about n·u times the sum of their magnitudes (Higham, Accuracy and Stability, §4.2); every
# other value compared here (features, losses, the bank's rows, the gradient norm) goes through
# shorter sums or through these gradients. Measured (AVX-512, docs/training.md): errors of a few u.
U = torch.finfo(torch.float32).eps / 2
REORDER = helper.B * (helper.K + 1) * (helper.SIZE // 2) ** 2 * U   # 4096 u ≈ 2.4e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    single = helper.run(out / "single", scenarios=("v2_selection", "v1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(HERE / "train_ddp_helper.py"), str(out), str(out / "single" / "rank-0.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(2)]
    return two, single


def within(error, tol):
    return error["exact"] and error["error"] <= tol * max(error["scale"], 1.0)


@pytest.mark.parametrize("scenario", ["v2_selection", "v1"])
def test_two_ranks_equal_one_process(runs, scenario):
    (r0, r1), single = (runs[0][0][scenario], runs[0][1][scenario]), runs[1][scenario]
    for key in ("loss", "batch_loss", "memory_loss", "grad_norm", "lr"):
        assert [r[key] for r in r0["records"]] == [r[key] for r in r1["records"]]  # identical on every rank
        assert [r[key] for r in r0["records"]] == pytest.approx([r[key] for r in single["records"]], rel=REORDER)
    assert single["records"][-1]["memory_loss"] > 0  # the bank is really in use
    if scenario == "v2_selection":  # from the same state, no similarity lies within rounding of a threshold
        assert [r["selected"] for r in r0["records"]] == [r["selected"] for r in single["records"]]
        assert [r["mining_positives"] for r in r0["records"]] == [r["mining_positives"] for r in single["records"]]
    for step, errors in enumerate(r0["errors"], 1):
        # the bank the ranks filled (v2) or start from, the summed per-rank gradients (loss × world,
        # DDP averages) and the bank after the step's update, each against the one process's
        assert all(within(errors[key], REORDER) for key in ("start", "grad", "bank")), (step, errors)
    assert all(torch.equal(r0["bank"][k], r1["bank"][k]) for k in single["bank"])  # the banks stay in sync
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in single["params"])  # so do the replicas


def test_nan_on_one_rank_is_skipped_by_both(runs):
    r0, r1 = runs[0][0]["nan"]["records"], runs[0][1]["nan"]["records"]
    assert [r["skipped"] for r in r0] == [0, 1, 0] == [r["skipped"] for r in r1]
    assert r0[1]["nonfinite_total"] == r1[1]["nonfinite_total"] == 1
    assert r0[2]["loss"] == r1[2]["loss"] and r0[2]["loss"] == r0[2]["loss"]  # finite, same on both
    params0, params1 = runs[0][0]["nan"]["params"], runs[0][1]["nan"]["params"]
    assert all(torch.equal(params0[k], params1[k]) for k in params0)
