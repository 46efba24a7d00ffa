"""What training does with a stored image that cannot be decoded (data.on_bad_sample).

"error" (default): stop, naming the shard, key and offset of the image. "skip": replace the row
by a good row of the same step, deterministically: the first good row with the same label (for
a neighbour, its anchor or another neighbour of that anchor: still a positive pair), else the
first good row of the step. The row takes that row's index and label too, so the memory bank is
written at the substitute's own index. Replacements are counted (TrainBatch.replaced, the
`bad_samples` metric) and training stops once more than `limit` were made on a rank.
"""

import sys

from insclr.data.reader import BadSample


class BadSamples:
    """The policy and its state: indices found undecodable, replacements made so far."""

    def __init__(self, mode="error", limit=100, log=None):
        if mode not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be error or skip, got {mode!r}")
        self.mode, self.limit = mode, int(limit)
        self.known = {}        # index -> BadSample, for images whose header passed but DALI could not decode
        self.replaced = 0      # replacements made (a sample counts each time a step holds it)
        self._warned = set()
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))

    def mark(self, problem):
        """Remember an image DALI failed to decode (its header looked fine); raises in "error" mode."""
        if self.mode == "error":
            raise self._hint(problem)
        self.known[problem.index] = problem

    def apply(self, step, indices, labels, results):
        """Rows of one step with the bad ones replaced: (indices, labels, jpegs, replaced count).

        results: per row (bytes or None, BadSample or None) from ShardReader.submit.
        """
        problems = [p if p is not None else self.known.get(int(i)) for i, (_, p) in zip(indices, results)]
        jpegs = [data for data, _ in results]
        bad = [r for r, p in enumerate(problems) if p is not None]
        if not bad:
            return indices, labels, jpegs, 0
        if self.mode == "error":
            raise self._hint(problems[bad[0]])
        good = [r for r, p in enumerate(problems) if p is None]
        if not good:
            raise BadSample(f"step {step}: every image of the step is damaged, first {problems[bad[0]]}",
                            problems[bad[0]].index)
        indices, labels = indices.copy(), labels.copy()
        for r in bad:
            same = [g for g in good if labels[g] == labels[r]]
            sub = same[0] if same else good[0]
            self._warn(problems[r], indices[sub])
            indices[r], labels[r], jpegs[r] = indices[sub], labels[sub], jpegs[sub]
        self.replaced += len(bad)
        if self.replaced > self.limit:
            raise BadSample(f"step {step}: {self.replaced} damaged images replaced on this rank, more than "
                            f"data.max_bad_samples={self.limit}; the shard folder needs repair. Last: "
                            f"{problems[bad[-1]]}", problems[bad[-1]].index)
        return indices, labels, jpegs, len(bad)

    def _hint(self, problem):
        return BadSample(f"{problem} (or train with data.on_bad_sample=skip to replace such images)",
                         problem.index)

    def _warn(self, problem, substitute):
        if problem.index not in self._warned:
            self._warned.add(problem.index)
            self._log(f"warning: {problem}; replaced by sample {int(substitute)} (data.on_bad_sample=skip)")

    def state_dict(self):
        return {"replaced": int(self.replaced)}  # the bad images themselves are found again on resume

    def load_state_dict(self, state):
        self.replaced = int(state.get("replaced", 0))
