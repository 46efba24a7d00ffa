"""TrainLoader: the rows of each training step, read by index out of the tars, in two views.

Per step: the sampler gives this rank's (indices, labels); the JPEG bytes are read with
positional reads by a thread pool, submitted `prefetch` steps ahead; the crop windows and flips
are drawn in Python from Generator([seed, rank, step]); DALI decodes each image once and makes
the augmented view (random resized crop + horizontal flip, size×size) and, when asked, the
no-aug view (noaug_size×noaug_size). DALI keeps `prefetch` steps in flight behind the one the
training step is using, so decoding overlaps the step.

With decoder="pillow" (`data.decoder`) Pillow decodes and resizes the same rows with the same crop
windows and flips instead, in `num_threads` threads, as the original's torchvision transforms do:
a reference for comparisons with the original trainer (docs/parity.md), several times slower.
"""

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from insclr.data import pipelines
from insclr.data.bad_samples import BadSamples
from insclr.data.prefetch import background
from insclr.data.reader import ShardReader, as_manifest, decode_failure
from insclr.data.resize import hwc_tensors, pillow_views, resize_batch
from insclr.data.transforms import rrc_windows, step_rng


@dataclass
class TrainBatch:
    indices: torch.Tensor          # int64 [R] sample indices of this rank's rows
    labels: torch.Tensor           # int64 [R] pseudo-labels (anchor + 1)
    aug: torch.Tensor              # uint8 [R,3,size,size] on the device (channels_last memory)
    noaug: torch.Tensor | None     # uint8 [R,3,noaug_size,noaug_size] or None
    wait_s: float                  # seconds the caller waited for this batch
    replaced: int = 0              # damaged images replaced in this batch (data.on_bad_sample=skip)


def crop_inputs(windows, flips, decode_whole):
    """Per-row DALI inputs of the crop: anchor (x, y), shape (w, h), resize ROI start/end (y, x).

    windows: int [R,4] (x, y, w, h); flips: bool [R]. With decode_whole the ROI is in image
    coordinates (the slice inputs are then unused), else relative to the decoded window.
    A flipped row has its ROI's x start and end swapped (DALI's resize then mirrors it).
    """
    windows = np.asarray(windows, dtype=np.float32)
    x, y, w, h = windows.T
    x0 = x if decode_whole else np.zeros_like(x)
    y0 = y if decode_whole else np.zeros_like(y)
    left, right = np.where(flips, x0 + w, x0), np.where(flips, x0, x0 + w)
    roi_start = np.stack([y0, left], axis=1)
    roi_end = np.stack([y0 + h, right], axis=1)
    return windows[:, :2].copy(), windows[:, 2:].copy(), roi_start, roi_end


class TrainLoader:
    """Iterate TrainBatch for the steps of `batches` (a NeighborBatchSampler or SequentialBatches).

    Starts at `batches.step`; after yielding step s it sets `batches.step = s + 1`, so the
    sampler's own state always reflects the batches consumed (not the ones prefetched).
    A damaged image stops the iteration naming it, or with on_bad_sample="skip" is replaced
    (insclr.data.bad_samples); more than `max_bad_samples` replacements stop it.
    """

    def __init__(self, shards, batches, size, crop_scale, crop_ratio=(3 / 4, 4 / 3), noaug_size=None,
                 device="cpu", num_threads=2, read_threads=4, prefetch=2, seed=0, rank=0,
                 on_bad_sample="error", max_bad_samples=100, decoder="dali"):
        if decoder not in ("dali", "pillow"):
            raise ValueError(f"data.decoder must be dali or pillow, got {decoder!r}")
        self.decoder = decoder
        self.manifest = as_manifest(shards)
        self.bad = BadSamples(on_bad_sample, max_bad_samples)
        self.batches = batches
        self.size, self.noaug_size = int(size), (int(noaug_size) if noaug_size else None)
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise ValueError(f"crop_scale must be 0 < lo <= hi, got {crop_scale}")
        self.device = torch.device(device)
        self.num_threads, self.prefetch = int(num_threads), max(1, int(prefetch))
        self.seed, self.rank = int(seed), int(rank)
        self.sizes = self.manifest.sizes("part")
        self.reader = ShardReader(self.manifest, "part", threads=read_threads)
        self._max_rows = len(batches.rank_batch(0)[0])  # step 0 is a full batch for both samplers
        self.dali_resizes = self.device.type == "cuda"  # chosen once: DALI or torch makes the views

    @classmethod
    def from_config(cls, data, batches, noaug_size=None, device="cpu", seed=0, rank=0):
        """A TrainLoader of the config section `data` (DataConfig) over `batches`."""
        return cls(data.shards, batches, data.size, data.crop_scale, crop_ratio=data.crop_ratio,
                   noaug_size=noaug_size, device=device, num_threads=data.num_threads,
                   read_threads=data.read_threads, prefetch=data.prefetch, seed=seed, rank=rank,
                   on_bad_sample=data.on_bad_sample, max_bad_samples=data.max_bad_samples, decoder=data.decoder)

    # ------------------------------------------------------------------ per-step inputs

    def augment(self, step, indices):
        """(windows int64 [R,4] (x, y, w, h), flips bool [R]) of `step` for these rows."""
        rng = step_rng(self.seed, self.rank, step)
        windows = rrc_windows(rng, self.sizes[indices], self.crop_scale, self.crop_ratio)
        flips = rng.random(len(indices)) < 0.5
        return windows, flips

    def _steps(self, start):
        """Endless (or until the sampler's end) stream of (step, indices, labels, byte futures)."""
        step = start
        while _valid(self.batches, step):
            indices, labels = self.batches.rank_batch(step)
            yield step, indices, labels, self.reader.submit(indices)
            step += 1

    def __iter__(self):
        """Batches from a producer thread (DALI run + CPU resizes), `prefetch` of them queued."""
        for (step, batch), wait_s in background(self._produce, self.prefetch, "insclr-train-loader", self.device):
            batch.wait_s = wait_s
            self.batches.step = step + 1
            yield batch

    def _produce(self):
        """(step, TrainBatch) for each step. An image DALI fails to decode (its header was fine) is
        marked bad and, with on_bad_sample="skip", the pipeline is built again from the earliest
        step not yet returned, which then gets the replacement."""
        if self.decoder == "pillow":
            yield from self._produce_pillow(self.batches.step)
            return
        start = self.batches.step
        while start is not None:
            start = yield from self._produce_from(start)

    def _produce_from(self, start):
        """(step, TrainBatch) for the steps from `start`, from one DALI pipeline fed by a StepFeed;
        returns the step to start again from after a decode failure, None at the sampler's end."""
        device_id, dec, op = pipelines.dali_devices(self.device)
        feed = StepFeed(self, start, depth=self.prefetch)
        pipe = pipelines.train_pipeline(
            source=feed, size=self.size, noaug_size=self.noaug_size, decoder_device=dec, op_device=op,
            resize=self.dali_resizes, batch_size=self._max_rows, num_threads=self.num_threads, device_id=device_id,
            prefetch_queue_depth=self.prefetch, seed=self.seed)
        try:
            pipelines.build(pipe)
            while True:
                try:
                    outs = pipe.run()
                except StopIteration:
                    return None
                except RuntimeError as e:
                    row = pipelines.failed_row(e)
                    if row is None or not feed.fed:
                        raise
                    self.bad.mark(decode_failure(self.reader, feed.rows_at(row)))
                    return feed.refeed()
                fed = feed.returned()
                aug, noaug = self._finish(outs, fed)
                yield fed.step, TrainBatch(torch.from_numpy(fed.indices), torch.from_numpy(fed.labels), aug, noaug,
                                           0.0, fed.replaced)
        finally:
            del pipe

    def _produce_pillow(self, start):
        """(step, TrainBatch) for the steps from `start`, each row decoded and resized by Pillow
        (`pillow_views`) in a pool of `num_threads` threads. A row Pillow cannot decode is marked
        bad and the step's rows are chosen again (BadSamples: an error, or its replacement)."""
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="insclr-pillow") as pool:
            for step, indices, labels, futures in self._steps(start):
                results = [f.result() for f in futures]
                while True:
                    rows, row_labels, jpegs, replaced = self.bad.apply(step, indices, labels, results)
                    windows, flips = self.augment(step, rows)
                    views = list(pool.map(self._pillow_row, jpegs, windows, flips))
                    failed = next((r for r, v in enumerate(views) if isinstance(v, Exception)), None)
                    if failed is None:
                        break
                    self.bad.replaced -= replaced  # made again on the next try
                    self.bad.mark(self.reader.bad_sample(int(rows[failed]), f"the image data is damaged "
                                                                            f"({views[failed]})"))
                aug = torch.from_numpy(np.stack([a for a, _ in views])).permute(0, 3, 1, 2)
                noaug = (torch.from_numpy(np.stack([n for _, n in views])).permute(0, 3, 1, 2)
                         if self.noaug_size else None)
                yield step, TrainBatch(torch.from_numpy(rows), torch.from_numpy(row_labels),
                                       aug.to(self.device), noaug.to(self.device) if noaug is not None else None,
                                       0.0, replaced)

    def _pillow_row(self, jpeg, window, flip):
        """pillow_views of one row, or the exception Pillow raised on it."""
        try:
            return pillow_views(jpeg, self.size, window, flip, self.noaug_size)
        except Exception as e:  # Pillow's errors for corrupt data vary (OSError, SyntaxError, ...)
            return e

    def _finish(self, outs, fed):
        """(aug, noaug) tensors on the device from a pipeline output: DALI resized them on a GPU;
        on the CPU it only decoded, and torch's uint8 resize (much faster there) makes the views."""
        whole = self.noaug_size is not None
        if self.dali_resizes:
            return (pipelines.to_torch(outs[0], self.device),
                    pipelines.to_torch(outs[1], self.device) if whole else None)
        decoded = hwc_tensors(outs[0])
        aug = resize_batch(decoded, self.size, self.size, fed.windows if whole else None, fed.flips)
        return aug, resize_batch(decoded, self.noaug_size, self.noaug_size) if whole else None

    def __len__(self):
        if self.batches.num_steps is None:
            raise TypeError("an endless sampler has no length")
        return self.batches.num_steps - self.batches.step

    # ------------------------------------------------------------------ resume

    def state_dict(self):
        """Everything needed to resume: the next step to yield (the augmentations are a function
        of (seed, rank, step)), the sampler's settings, the replacements made so far."""
        return {"step": int(self.batches.step), "seed": self.seed, "rank": self.rank,
                "sampler": self.batches.state_dict(), "bad_samples": self.bad.state_dict()}

    def load_state_dict(self, state):
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader has {self.seed}")
        if "sampler" in state:
            self.batches.load_state_dict(state["sampler"])  # refuses another N, batch or k
        self.bad.load_state_dict(state.get("bad_samples", {}))
        # Batches prefetched by a running iterator are dropped: iterate again after loading.
        self.batches.step = int(state["step"])

    def close(self):
        self.reader.close()


@dataclass
class FedStep:
    """A step handed to DALI: what its output needs to become a TrainBatch."""

    step: int
    indices: np.ndarray            # int64 [R] after replacing damaged images
    labels: np.ndarray
    windows: np.ndarray            # int64 [R, 4] crop windows (x, y, w, h)
    flips: np.ndarray              # bool [R]
    replaced: int                  # damaged images replaced in this step


class StepFeed:
    """The external source of one DALI pipeline: each call hands DALI the next step's JPEGs and crops.

    It owns two queues: `ahead`, the steps whose bytes are being read (kept `depth` + 1 steps
    ahead of DALI), and `fed`, the steps handed to DALI whose output has not come back yet.

    The DALI contract it relies on (external_source with batch=True and a callable): DALI calls
    the source once per iteration, in order, running at most `depth` (prefetch_queue_depth)
    iterations ahead of the outputs `pipe.run()` returns, and returns them in the order they were
    fed. `returned()` checks this each time: an output with no step fed, or more steps in flight
    than the pipeline can hold, raises RuntimeError naming the broken contract instead of pairing an
    output with another step's indices.
    """

    def __init__(self, loader, start, depth):
        self.loader, self.depth = loader, int(depth)
        self.whole = loader.noaug_size is not None
        self.steps = loader._steps(start)
        self.ahead, self.fed = deque(), deque()
        for nxt in self.steps:  # start the reads of the first depth + 1 steps
            self.ahead.append(nxt)
            if len(self.ahead) > self.depth:
                break

    def __call__(self):
        if not self.ahead:
            raise StopIteration
        step, indices, labels, futures = self.ahead.popleft()
        for nxt in self.steps:  # keep the reads depth + 1 steps ahead of DALI
            self.ahead.append(nxt)
            break
        loader = self.loader
        indices, labels, jpegs, replaced = loader.bad.apply(step, indices, labels, [f.result() for f in futures])
        windows, flips = loader.augment(step, indices)  # after the replacement: the crops fit the images
        anchor, shape, roi_start, roi_end = crop_inputs(windows, flips, decode_whole=self.whole)
        self.fed.append(FedStep(step, indices, labels, windows, flips, replaced))
        if len(self.fed) > self.depth + 1:
            raise RuntimeError(f"train loader: DALI asked for {len(self.fed)} steps without returning one "
                               f"(prefetch_queue_depth={self.depth}); the external source contract is broken")
        if self.whole:
            return jpegs, list(roi_start), list(roi_end)
        return jpegs, list(anchor), list(shape), list(roi_start), list(roi_end)

    def returned(self):
        """The FedStep of the output pipe.run() just returned: the oldest step fed."""
        if not self.fed:
            raise RuntimeError("train loader: DALI returned an output for no step fed to it; the external "
                               "source contract (one call per iteration, outputs in feeding order) is broken")
        return self.fed.popleft()

    def rows_at(self, row):
        """The dataset index at `row` of every step in flight (a decode error names only the row)."""
        return [f.indices[row] for f in self.fed if row < len(f.indices)]

    def refeed(self):
        """After a decode failure: the step to build the pipeline again from; its replacements and
        those of the later steps in flight are made again, so they are uncounted here."""
        self.loader.bad.replaced -= sum(f.replaced for f in self.fed)
        return self.fed[0].step


def _valid(batches, step):
    return batches.num_steps is None or step < batches.num_steps
