"""Both loaders under `torchrun --nproc_per_node 2` (gloo): streamed indices partition the set,
and the two ranks' training rows make up the global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from data_shards import make_shards


def test_loaders_on_two_ranks(tmp_path):
    root = tmp_path / "shards"
    make_shards(root, queries=0)
    out = tmp_path / "seen.json"
    script = Path(__file__).with_name("data_dist_script.py")
    env = dict(os.environ, INSCLR_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(root), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    streamed = ranks[0]["streamed"] + ranks[1]["streamed"]
    assert sorted(streamed) == list(range(23)) and not set(ranks[0]["streamed"]) & set(ranks[1]["streamed"])
    for step in range(3):
        r0, r1 = ranks[0]["rows"][step], ranks[1]["rows"][step]
        gidx, glab = r0["global"]
        assert r0["global"] == r1["global"]  # every rank computes the same global batch
        # Rank r: anchors[2r:2r+2] then their neighbours; together: the global batch's rows.
        assert r0["indices"][:2] + r1["indices"][:2] == gidx[:4]
        assert r0["indices"][2:] + r1["indices"][2:] == gidx[4:]
        assert r0["labels"][2:] + r1["labels"][2:] == glab[4:]
