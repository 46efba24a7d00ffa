"""The side-by-side runs: for each seed, train with ours and with the original from the same initial
weights on the same shards and pool, evaluate both final models with our evaluator, collect mAP.

Every output is kept under OUT (OUT/<trainer>/seed-S/...): a run that finished is not redone, so
an interrupted comparison continues where it stopped and more seeds can be added later.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from insclr.bench.parity import launch_ours
from insclr.bench.parity.launch_original import (link_gldv2, original_ids, original_options, write_neighbors)

TRAINERS = ("ours", "original")


def _run(argv, log, env=None, what=""):
    """Run argv with stdout+stderr into `log`; an error line with the log's tail when it fails."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code:
        tail = Path(log).read_text()[-1500:]
        raise RuntimeError(f"parity: {what} failed (exit {code}); see {log}:\n{tail}")
    return time.perf_counter() - start


def _env(threads):
    here = str(Path(__file__).resolve().parents[3])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else ""), "INSCLR_NO_PROGRESS": "1",
            "OMP_NUM_THREADS": str(threads)}


class Parity:
    """One comparison. cfg: our Config (data.shards/data.pool resolved); gldv2: the synthetic GLDv2
    folder the shards were made from; shards_root: the folder with roxford5k/ and rparis6k/ shards."""

    def __init__(self, cfg, config_path, overrides, gldv2, shards_root, original, out, threads=1,
                 workers=1, size=256, log=print):
        self.cfg, self.config_path, self.overrides = cfg, config_path, list(overrides)
        self.gldv2, self.shards_root, self.original = Path(gldv2), Path(shards_root), original
        self.out, self.threads, self.workers, self.size, self.log = Path(out), threads, workers, size, log
        self.out.mkdir(parents=True, exist_ok=True)

    def prepare_original(self):
        """Working folder, neighbour file and initial weights of the original, checked to number the
        training images as our shards do (else the pool's indices would mean other images)."""
        from insclr.shard.manifest import Manifest

        work = self.out / "original" / "work"
        link_gldv2(self.gldv2, work)
        ours = Manifest.load(self.cfg.data.shards).ids("part")
        theirs = original_ids(work)
        if ours != theirs:
            raise ValueError(f"parity: {self.cfg.data.shards} numbers {len(ours)} images, {self.gldv2}/train_clean.csv "
                             f"{len(theirs)} in another order; make the shards from this GLDv2 folder")
        neighbors = self.out / "original" / "neighbors.npz"
        if not neighbors.is_file():
            write_neighbors(self.cfg.data.pool, neighbors)
        init = self.out / "original" / "init.pth"
        if not init.is_file():
            launch_ours.initial_weights(self.cfg.model, init)
        return work, neighbors, init, len(ours)

    def train_ours(self, seed, run):
        argv = launch_ours.train_command(self.config_path, run / "train", seed, self.cfg.train.steps,
                                         self.cfg.data.shards, self.cfg.data.pool, self.threads, self.overrides)
        seconds = _run(argv, run / "train.log", _env(self.threads), f"our training (seed {seed})")
        return run / "train" / "model.pt", run / "train" / "metrics.jsonl", seconds

    def train_original(self, seed, run):
        work, neighbors, init, num_images = self.prepare_original()
        prefix = (run / "train").resolve()
        opts = original_options(self.cfg, str(prefix) + "_", neighbors.resolve(), init.resolve(), self.workers,
                                num_images)
        (run / "opts.json").write_text(json.dumps(opts, indent=1))
        metrics = run / "metrics.jsonl"
        metrics.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "insclr.bench.parity.launch_original", "--original", str(Path(self.original).resolve()),
                "--work", str(work), "--opts", str((run / "opts.json").resolve()), "--seed", str(seed),
                "--threads", str(self.threads)]
        env = {**_env(self.threads), "INSCLR_PARITY_METRICS": str(metrics.resolve())}
        seconds = _run(argv, run / "train.log", env, f"the original's training (seed {seed})")
        finals = sorted(run.glob("train_*/model_final.pth"))
        if not finals:
            raise RuntimeError(f"parity: the original wrote no model_final.pth under {run}/train_*")
        model = launch_ours.import_original_model(finals[-1], self.cfg.model, run / "model.pt")
        return model, metrics, seconds

    def one(self, trainer, seed):
        """{set: mAP M %, 'train_s': seconds, 'loss_last100': mean loss} of one run (cached in result.json)."""
        run = self.out / trainer / f"seed-{seed}"
        result = run / "result.json"
        if result.is_file():
            return json.loads(result.read_text())
        run.mkdir(parents=True, exist_ok=True)
        self.log(f"parity: training {trainer} seed {seed} ({self.cfg.train.steps} steps)", flush=True)
        model, metrics, seconds = (self.train_ours if trainer == "ours" else self.train_original)(seed, run)
        self.log(f"parity: evaluating {trainer} seed {seed} (trained in {seconds / 60:.1f} min)", flush=True)
        _run(launch_ours.eval_command(model, self.shards_root, run / "eval.json", self.size), run / "eval.log",
             _env(self.threads), f"the evaluation of {trainer} seed {seed}")
        figures = {**launch_ours.read_map(run / "eval.json"), "train_s": seconds,
                   "loss_last100": last_losses(metrics, trainer)}
        result.write_text(json.dumps(figures, indent=1))
        return figures


def last_losses(metrics, trainer, last=100):
    """Mean total loss of the last `last` logged steps of a run's metrics.jsonl (ours or the stand-in writer's)."""
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines()] if Path(metrics).is_file() else []
    losses = [r["loss"] for r in records if r.get("step", 0) > 0 and "loss" in r]
    return sum(losses[-last:]) / len(losses[-last:]) if losses else float("nan")
