"""StreamLoader: every sample of a shard split once, in index order, split over ranks.

Used by feature extraction (mode "square", ALGORITHM §3) and evaluation (modes "longest" and
"query", §11). Yields (images uint8 [B,3,H,W] on `device`, indices int64 [B]).
"""

import itertools
from collections import deque

import numpy as np
import torch

from insclr.data import pipelines
from insclr.data.prefetch import background
from insclr.data.reader import ShardReader, as_manifest, decode_failure, gather
from insclr.data.resize import hwc_tensors, lanczos_batch, resize_batch
from insclr.data.transforms import clip_window, query_shape, query_window, thumbnail_shape

MODES = ("square", "longest", "query")
READ_AHEAD = 4  # batches whose reads are in flight: DALI's prefetch (2) plus two


def rank_range(n, rank, world_size):
    """[start, stop) of rank's contiguous part of n samples (DALI's reader sharding formula)."""
    return n * rank // world_size, n * (rank + 1) // world_size


class StreamLoader:
    """Iterate over split `split` of a shard folder (or Manifest) in batches.

    Rank r gets the contiguous part `rank_range(n, r, world_size)`; the union over ranks is every
    sample exactly once. `len()` is the number of batches on this rank (ranks may differ by one),
    `num_samples` the number of samples on this rank. Modes "longest" and "query" use batch 1.
    The shard files are checked when the loader is made (ShardReader), each image before DALI
    decodes it; a damaged one stops the pass with a BadSample naming its shard, key and offset.
    """

    def __init__(self, shards, split="part", mode="square", size=512, batch_size=32, device="cpu",
                 num_threads=2, rank=0, world_size=1, read_threads=4):
        if mode not in MODES:
            raise ValueError(f"StreamLoader mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.manifest = as_manifest(shards)
        self.split, self.mode, self.size = split, mode, int(size)
        self.batch_size = 1 if mode in ("longest", "query") else int(batch_size)
        self.device = torch.device(device)
        self.num_threads, self.rank, self.world_size = int(num_threads), int(rank), int(world_size)
        n = self.manifest.num_samples(split)
        self.start, self.stop = rank_range(n, self.rank, self.world_size)
        self.num_samples = self.stop - self.start
        if mode == "query":
            self._boxes = self._query_boxes()
        if mode == "longest":  # (h, w) per sample: the original's thumbnail of the stored image
            self._shapes = np.array([thumbnail_shape(int(w), int(h), self.size)[::-1]
                                     for w, h in self.manifest.sizes(split)], dtype=np.int64).reshape(-1, 2)
        self.reader = ShardReader(self.manifest, split, threads=read_threads)  # checks the files now
        self._pipe = None  # the streamed modes' built pipeline, kept between passes ...
        self._fed = None   # ... and the indices of the batches it holds (see _build_stream)

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        if self.num_samples == 0:
            return iter(())
        produce = self._iter_query if self.mode == "query" else self._iter_stream
        # Decoding and (on the CPU) resizing run in a thread, two batches ahead of the consumer.
        return (item for item, _ in background(produce, 2, "insclr-stream-loader", self.device))

    def close(self):
        self._pipe = None
        self.reader.close()

    # ------------------------------------------------------------------ streamed modes

    def batch_indices(self, b):
        """int64 [batch_size]: the samples of batch b of this rank (the last batch padded with its
        final sample, so that every run of the pipeline has the same batch size)."""
        idx = np.arange(self.start + b * self.batch_size, min(self.start + (b + 1) * self.batch_size, self.stop))
        return np.concatenate([idx, np.full(self.batch_size - len(idx), idx[-1])]).astype(np.int64)

    def _build_stream(self):
        """A pipeline fed with this rank's batches in order, endlessly (the next pass starts where
        one ends); reads run a few batches ahead of DALI. Returns (pipe, fed): `fed` holds the
        indices of the batches given to DALI and not yet returned."""
        device_id, dec, op = pipelines.dali_devices(self.device)
        order = itertools.cycle(range(len(self)))
        ahead, fed = deque(), deque()

        def read_next():
            idx = self.batch_indices(next(order))
            ahead.append((idx, self.reader.submit(idx)))

        for _ in range(READ_AHEAD):
            read_next()

        def source():
            idx, futures = ahead.popleft()
            read_next()
            jpegs = [gather(f) for f in futures]  # a BadSample stops the pass here, before DALI sees it
            fed.append(idx)
            if self.mode == "longest":
                return jpegs, [self._shapes[i].astype(np.float32) for i in idx]
            return jpegs

        pipe = pipelines.stream_pipeline(
            source=source, mode=self.mode, size=self.size, decoder_device=dec, op_device=op,
            resize=self._dali_resizes, batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=device_id, prefetch_queue_depth=2, seed=0)
        return pipelines.build(pipe), fed

    def _iter_stream(self):
        # Building a pipeline costs ~2 s on a GPU (decoder and memory set-up), so a finished pass
        # hands its pipeline to the next: after exactly one epoch the source stands at the start
        # of the next. A pass left unfinished drops its pipeline.
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            pipe, self._fed = self._build_stream()
        fed = self._fed
        left = self.num_samples
        for _ in range(len(self)):
            try:
                images = pipe.run()[0]
            except RuntimeError as e:
                raise self._decode_error(e, fed) from None
            indices = fed.popleft()
            take = min(left, self.batch_size)  # the padding of the last batch repeats the last sample
            left -= take
            yield self._output(images, indices, take), torch.from_numpy(indices[:take].copy())
        self._pipe = pipe

    def _decode_error(self, error, fed):
        """A DALI decode failure as a BadSample naming the sample (header checks passed: the damage
        is in the image data), or the error itself when DALI names no sample."""
        row = pipelines.failed_row(error)
        if row is None or not fed:
            return error
        return decode_failure(self.reader, [idx[row] for idx in fed if row < len(idx)])

    @property
    def _dali_resizes(self):
        return self.device.type == "cuda"  # on the CPU torch's uint8 resize is much faster

    def _output(self, images, indices, take):
        if self._dali_resizes:
            return pipelines.to_torch(images, self.device)[:take]
        decoded = hwc_tensors(images)[:take]
        if self.mode == "square":
            return resize_batch(decoded, self.size, self.size)
        out_h, out_w = self._shapes[indices[0]].tolist()  # "longest": batch 1
        return lanczos_batch(decoded, out_h, out_w)

    # ------------------------------------------------------------------ query crops

    def _query_boxes(self):
        gt = self.manifest.ground_truth()
        if gt is None or "gnd" not in gt:
            raise ValueError(f"{self.manifest.root}: mode 'query' needs ground_truth.json with query boxes")
        gnd = gt["gnd"]
        n = self.manifest.num_samples(self.split)
        if len(gnd) != n:
            raise ValueError(f"{self.manifest.root}/ground_truth.json: {len(gnd)} entries for {n} "
                             f"samples of split {self.split!r}")
        sizes, orig = self.manifest.sizes(self.split), self.manifest.orig_sizes(self.split)
        # per query: decode window x, y, w, h; the box's corner relative to it, its w, h; out w, h
        boxes = np.zeros((n, 10), dtype=np.int64)
        for q, entry in enumerate(gnd):
            if "bbx" not in entry or len(entry["bbx"]) != 4:
                raise ValueError(f"{self.manifest.root}/ground_truth.json: entry {q} has no 4-value 'bbx'")
            size = (int(sizes[q][0]), int(sizes[q][1]))
            box = query_window(entry["bbx"], size, orig[q])
            window, (dx, dy) = clip_window(box, size)
            boxes[q] = (*window, dx, dy, box[2], box[3], *query_shape(box, size, self.size))
        return boxes

    def _iter_query(self):
        device_id, dec, op = pipelines.dali_devices(self.device)
        order = iter(range(self.start, self.stop))
        fed = deque()

        def source():
            q = next(order)  # StopIteration ends the pipeline's epoch
            x, y, w, h, dx, dy, bw, bh, ow, oh = self._boxes[q].tolist()
            jpeg = self.reader.read([q])[0]
            fed.append(q)
            return ([jpeg], [np.array([x, y], np.float32)], [np.array([w, h], np.float32)],
                    [np.array([dx, dy], np.float32)], [np.array([bw, bh], np.float32)],
                    [np.array([oh, ow], np.float32)])

        pipe = pipelines.crop_pipeline(source=source, decoder_device=dec, op_device=op,
                                       resize=self._dali_resizes, batch_size=1,
                                       num_threads=self.num_threads, device_id=device_id,
                                       prefetch_queue_depth=2, seed=0)
        try:
            pipelines.build(pipe)
            for q in range(self.start, self.stop):
                try:
                    (images,) = pipe.run()
                except RuntimeError as e:
                    raise (decode_failure(self.reader, list(fed)) if pipelines.failed_row(e) is not None
                           else e) from None
                fed.popleft()
                if self._dali_resizes:
                    out = pipelines.to_torch(images, self.device)
                else:
                    out = lanczos_batch(hwc_tensors(images), int(self._boxes[q, 9]), int(self._boxes[q, 8]))
                yield out, torch.tensor([q], dtype=torch.int64)
        finally:
            del pipe
