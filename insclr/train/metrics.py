"""Per-step metrics: OUT/metrics.jsonl (rank 0), optional TensorBoard, and the tqdm bar."""

import json
import math
from pathlib import Path

import torch

from insclr.io import JsonLines, atomic_path


def read_records(records):
    """Replace the tensors among the values of `records` (dicts) by numbers, in place, with one
    device -> host copy for all of them: int for an integer tensor, float otherwise. Returns `records`.

    The copy goes through float64, which holds every float32 value and every count exactly.
    """
    slots = [(record, key) for record in records for key, value in record.items() if torch.is_tensor(value)]
    if not slots:
        return records
    values = torch.stack([record[key].detach().reshape(()).double() for record, key in slots]).tolist()
    for (record, key), value in zip(slots, values):
        record[key] = value if record[key].is_floating_point() else int(value)
    return records


def trim_after(path, step):
    """Drop records with step > `step` from a JSON-lines file (a resumed run rewrites those steps)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", 0) <= step:
            keep.append(line)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(k + "\n" for k in keep))


class Metrics:
    """Writes one JSON record per step on rank 0; no-op elsewhere.

    `start_step` > 0 means a resumed run: records after it (written before the interruption) are
    removed, so the file holds each step exactly once.

    A step's record may hold device tensors: `add` keeps it, and `flush` reads every kept record
    in one copy (read_records) and writes them, so a run reads the device every train.log_every
    steps rather than every step. Other ranks keep nothing and read nothing.
    """

    def __init__(self, out, enabled, start_step=0, tensorboard=False):
        self.enabled = enabled
        self.pending = []
        self.lines = self.writer = None
        if not enabled:
            return
        path = Path(out) / "metrics.jsonl"
        if start_step > 0:
            trim_after(path, start_step)
        self.lines = JsonLines(path, truncate=start_step == 0)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("train.tensorboard=true but tensorboard is not installed; writing metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(Path(out) / "tb"))

    def add(self, record):
        """Keep a step's record (values: numbers or 0-d device tensors) until the next `flush`."""
        if self.enabled:
            self.pending.append(record)

    def flush(self):
        """Read the kept records (one device -> host copy), write them in order; returns them."""
        records, self.pending = self.pending, []
        for record in read_records(records):
            self.log(record)
        return records

    def log(self, record):
        """Write a record of numbers now (step 0, evaluation)."""
        if not self.enabled:
            return
        self.lines.write(record)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self):
        self.flush()
        if self.lines is not None:
            self.lines.close()
        if self.writer is not None:
            self.writer.close()
