"""Which checkpoint a run resumes from, and whether this run may resume it at all.

Resuming must continue exactly the run that wrote the checkpoint. Every config key that changes
the sequence of steps (what each step reads, how it augments, what it computes) or the shapes of
the saved state must therefore be the same; only the keys in MAY_CHANGE may differ (how long to
train, how often to log / evaluate / save, where and how fast to run). See docs/training.md.
"""

import sys
from pathlib import Path

from insclr import dist
from insclr.config import Config, to_dict
from insclr.train import checkpoint

# Keys a resumed run may change. Everything else must match the checkpoint (a key added to the
# schema later is then protected by default).
MAY_CHANGE = frozenset({
    "train.steps",            # may grow (a run extended), never below the checkpoint's step
    "train.out", "train.resume",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.tensorboard", "train.progress", "train.max_nonfinite",
    "train.device", "train.compile",          # where and how the same computation runs
    "data.shards", "data.pool",               # the paths may move; their identities must match
    "data.num_threads", "data.read_threads", "data.prefetch",
    "data.on_bad_sample", "data.max_bad_samples",
    "model.init", "model.weights",            # used at step 0 only
    "memory.init_batch",                      # the v2 initialisation pass happens at step 0 only
    "eval.data", "eval.shards_root", "eval.scales", "eval.show",
})


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_keys(cfg, identities):
    """{key: plain value} that a run resuming this one must reproduce: the fixed config keys, the
    world size and the identities of the data (`identities`: {"data.shards": id, "data.pool": id})."""
    keys = {k: v for k, v in _flat(to_dict(cfg)).items() if k not in MAY_CHANGE}
    keys["world_size"] = dist.world_size()
    keys.update({f"{k}#identity": v for k, v in identities.items()})
    return keys


def stored_keys(path, manifest):
    """The resume keys a checkpoint recorded; for a checkpoint of an older version (no manifest),
    those of the config.yaml saved in it (no identities), or {} when that cannot be read."""
    if manifest is not None:
        return manifest.get("resume", {})
    from insclr.config import ConfigError, load_config

    try:
        keys = resume_keys(load_config(Path(path) / "config.yaml"), {})
    except (ConfigError, OSError):
        _warn(f"{path}: no manifest and no readable config.yaml; cannot check that this run continues it")
        return {}
    keys["world_size"] = len(list(Path(path).glob("rank-*.pt")))
    return keys


def check_compatible(path, stored, current, cfg):
    """Raise ValueError naming every key in which this run differs from the checkpoint at `path`."""
    if not stored:
        return  # nothing recorded to compare with
    # A key the checkpoint does not know (added to the schema since) must be at its default; a key
    # it has that this version lacks is gone from the schema; identities of old checkpoints are unknown.
    defaults = _flat(to_dict(Config()))
    changed = sorted(k for k in current if k in stored and stored[k] != current[k]
                     or k not in stored and k in defaults and current[k] != defaults[k])
    stored = {**defaults, **stored}
    if not changed:
        return
    def show(k):
        if k.endswith("#identity"):
            key = k[:-len("#identity")]
            return (f"{key}={getattr(cfg.data, key.split('.')[1])} holds other data than the checkpoint's "
                    f"(identity {str(current.get(k))[:12]}, checkpoint {str(stored.get(k))[:12]})")
        return f"{k}={current.get(k)!r} (checkpoint: {stored.get(k)!r})"
    raise ValueError(f"train.resume: {path} was written by a run with other settings: "
                     f"{'; '.join(show(k) for k in changed)}. These keys must not change when resuming (they "
                     f"change the steps or the saved state, docs/training.md); restore them, set "
                     f"train.resume=none, or train into a new train.out")


def _warn(text):
    if dist.is_main():
        print(f"warning: {text}", file=sys.stderr, flush=True)


def candidates(resume, out):
    """train.resume -> checkpoint folders to try, best first ([]: a fresh start).

    'auto': the complete checkpoints in OUT/ckpt, newest first; a folder: just that one.
    """
    if resume in ("", "none"):
        return []
    if resume == "auto":
        return [path for _, path in reversed(checkpoint.checkpoints(out))]
    path = Path(resume)
    if not ((path / "state.pt").is_file() or (path / checkpoint.MANIFEST).is_file()):
        raise FileNotFoundError(f"train.resume={resume!r}: not a checkpoint folder (no state.pt or "
                                f"{checkpoint.MANIFEST} in {path})")
    return [path]


def load_checkpoint(resume, out, device):
    """(path, manifest, shared, banks, per_rank) of the checkpoint to resume, or None (fresh start).

    'auto' takes the latest checkpoint that verifies: a damaged one is skipped with a warning
    naming the bad file and the previous one is tried. An explicit train.resume folder that is
    damaged is an error naming the file. Collective: every rank agrees on the folder.
    """
    damaged = []
    for path in candidates(resume, out):
        try:
            manifest, *state = checkpoint.load(path, map_location=device)
            error = None
        except checkpoint.DamagedCheckpoint as e:
            error = e
        if dist.any_rank(error is not None, device):
            error = error or checkpoint.DamagedCheckpoint(f"{path}: damaged (reported by another rank)")
            if resume != "auto":
                raise error
            damaged.append(str(error))
            _warn(f"{error}; skipping checkpoint {path.name}")
            continue
        return (path, manifest, *state)
    if damaged:
        raise ValueError(f"train.resume=auto: every checkpoint in {Path(out) / 'ckpt'} is damaged (newest: "
                         f"{damaged[0]}); move that folder away to start afresh, or set train.resume=none")
    return None
