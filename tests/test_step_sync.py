"""The step reads the device once (its finite check), a non-finite step changes nothing, and the
loop reads the steps' figures in batches while metrics.jsonl keeps one record per step (issue 15).

Host reads are counted with a TorchFunctionMode on the CPU: every call that would copy a device
value to the host on a GPU (`item`, `tolist`, `bool(t)`, `float(t)`, `int(t)`, `cpu`, `numpy`, `.to`
the host). Its limit: the mode is off while it handles a call, so a read made inside another
intercepted call (an autograd.Function's backward run by `backward()`) is not seen; the GPU test
checks the same with CUDA's own synchronisation report, which sees every read.
"""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_ddp_helper as helper  # noqa: E402
from train_loop_helper import labelled_set  # noqa: E402

from insclr.data import NeighborBatchSampler, SequentialBatches, TrainBatch  # noqa: E402
from insclr.train import main  # noqa: E402
from insclr.train import step as step_module  # noqa: E402
from insclr.train.banks import fill_bank  # noqa: E402
from insclr.train.metrics import read_records  # noqa: E402

MEMORY = {
    "none": ["memory.version=none"],
    "v1": ["memory.version=v1", "memory.start_step=0", "memory.get_step=1", "memory.get_size=8",
           "memory.potential_positive=2"],
    "v2": helper.SCENARIOS["v2_selection"] + ["memory.start_step=0", "memory.get_step=1"],
}
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


def _to_host(args, kwargs):
    """Whether a Tensor.to call copies a tensor that is not on the host to the host."""
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host, except inside `paused` calls."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self.paused and (name in READS or name == "to" and _to_host(args, kwargs)):
            self.count += 1
        return func(*args, **kwargs)

    def pause(self, fn):
        """`fn` with its own reads not counted."""
        def run(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return run

    def pause_optimizer(self, optimizer):
        """The optimizer's steps not counted (hooks: the LR scheduler wraps `step` itself)."""
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "paused", self.paused + 1))
        optimizer.register_step_post_hook(lambda *_: setattr(self, "paused", self.paused - 1))


def make_run(version, device="cpu", extra=()):
    """(state, settings, batch of step s) for `version` on the small in-memory set of train_ddp_helper."""
    from insclr.candidates import CandidatePool
    from insclr.train.loop import make_state

    cfg = helper.config(MEMORY[version] + [f"train.device={device}", *extra])
    neighbors, similarities = helper.pool()
    pixels = helper.images().to(device)
    state, settings = make_state(cfg, torch.device(device), CandidatePool.from_arrays(neighbors, similarities))
    if state.bank.needs_fill:
        seq = SequentialBatches(helper.N, cfg.memory.init_batch)
        fill_bank(state, settings, [TrainBatch(torch.from_numpy(i), torch.from_numpy(l), pixels[i], pixels[i], 0.0)
                                    for i, l in seq])
    sampler = NeighborBatchSampler(neighbors, helper.B, helper.K, seed=0)

    def batch():
        idx, lab = (torch.from_numpy(a) for a in sampler.next())
        return TrainBatch(idx, lab, pixels[idx], pixels[idx] if cfg.noaug.enabled else None, 0.0)
    return state, settings, batch


@pytest.mark.parametrize("version", ["none", "v1", "v2"])
def test_one_host_read_per_step(version, monkeypatch):
    state, settings, batch = make_run(version)
    counter = HostReads()
    # Not counted: the bank's `get` (its nonzero / unique / sampling sizes are the mining's dynamic
    # shapes, read by design) and the optimizer's step (Adam on the CPU keeps its step counters as
    # host tensors and reads them with .item(); on CUDA the fused kernel keeps them on the device).
    monkeypatch.setattr(state.bank, "get", counter.pause(state.bank.get))
    counter.pause_optimizer(state.optimizer)
    records = []
    for _ in range(3):   # step 1: bank update only; steps 2 and 3 read the bank as well
        b = batch()
        before = counter.count
        with counter:
            records.append(step_module.train_step(state, settings, b))
        assert counter.count - before == 1, f"step {state.step}: {counter.count - before} host reads"
    read_records(records)
    assert all(r["skipped"] == 0 for r in records)
    if version != "none":
        assert records[-1]["memory_loss"] > 0   # the memory loss (and its reads) took part


def _snapshot(state):
    """Copies of everything a skipped step must leave alone."""
    def copy(value):
        if torch.is_tensor(value):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value
    return copy({"model": state.module.state_dict(), "optimizer": state.optimizer.state_dict(),
                 "bank": state.bank.state_dict()})


def _bytes(t):
    return t.detach().contiguous().flatten().view(torch.uint8)


def _equal(a, b):
    """Bit for bit: the same dtype, shape and bytes."""
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _nan_features(model):
    """The augmented forward with one NaN row of features (the model's output, before the gather)."""
    def forward(x):
        out = model(x).clone()
        out[1] = float("nan")
        return out
    return forward


def _nan_memory_loss():
    """A contrastive_loss whose memory loss is NaN (the batch loss stays finite)."""
    loss = step_module.contrastive_loss

    def nan_memory(*args, memory=False, **kw):
        value, stats = loss(*args, memory=memory, **kw)
        return (value * float("nan") if memory else value), stats
    return nan_memory


def _nan_noaug():
    """The no-aug features with one NaN row (what bank v2's no-aug table and the selection read)."""
    features = step_module.noaug_features

    def nan_noaug(*args, **kwargs):
        out = features(*args, **kwargs).clone()
        out[1] = float("nan")
        return out
    return nan_noaug


@pytest.mark.parametrize("bn", ["frozen", "train"])
@pytest.mark.parametrize("version,where,why", [
    (v, where, why) for v in ("v1", "v2")
    for where, why in (("batch_loss", "batch"), ("features", "batch"), ("memory_loss", "memory"))
] + [("v2", "noaug", "batch")])   # v2's scenario has the no-aug view (selection), v1's has none
def test_nonfinite_step_leaves_model_optimizer_and_bank_bit_identical(version, where, why, bn, monkeypatch):
    """bn=train (train.freeze_bn=false): the augmented forward updates the BatchNorm running
    statistics, which a skipped step puts back as well."""
    state, settings, batch = make_run(version, extra=["train.freeze_bn=false"] if bn == "train" else [])
    assert settings.freeze_bn == (bn == "frozen")
    for _ in range(2):   # a bank with rows and an optimizer with moments before the bad step
        assert read_records([step_module.train_step(state, settings, batch())])[0]["skipped"] == 0
    before = _snapshot(state)
    get = state.bank.get

    def finite_get(*args, **kwargs):  # the mining never sees a NaN row (the step writes zeros instead)
        assert all(torch.isfinite(t).all() for t in state.bank.state_dict().values() if t.is_floating_point())
        return get(*args, **kwargs)
    monkeypatch.setattr(state.bank, "get", finite_get)
    if where == "batch_loss":
        monkeypatch.setattr(step_module, "contrastive_loss", helper.nan_batch_loss(1, 0))
    elif where == "features":
        monkeypatch.setattr(state, "model", _nan_features(state.model))
    elif where == "noaug":
        assert settings.noaug_scales is not None
        monkeypatch.setattr(step_module, "noaug_features", _nan_noaug())
    else:
        monkeypatch.setattr(step_module, "contrastive_loss", _nan_memory_loss())
    record = step_module.train_step(state, settings, batch())
    assert record["skipped"] == 1 and record["nonfinite"] == why and state.nonfinite_total == 1
    assert _equal(_snapshot(state), before)
    monkeypatch.undo()
    assert read_records([step_module.train_step(state, settings, batch())])[0]["skipped"] == 0  # trains on


# --- the loop: records read in batches, one per step in metrics.jsonl ------------------------------

KEYS = ["step", "loss", "batch_loss", "memory_loss", "lr", "grad_norm", "skipped", "batch_pos_per_row",
        "batch_neg_per_row"]
MEMORY_KEYS = ["memory_pos_per_row", "memory_neg_per_row", "mining_negatives", "mining_candidates"]
TIMING = ["images_per_s", "step_s", "data_wait"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return labelled_set(tmp_path_factory.mktemp("step_sync_data"))


def _train(data, out, extra):
    args = [f"data.shards={data / 'shards'}", f"data.pool={data / 'pool.npz'}", "data.size=48", "data.k=3",
            "data.num_threads=1", "data.read_threads=1", "model.dim=32", "memory.version=v1",
            "memory.start_step=0", "memory.get_step=2", "memory.get_size=8", "memory.potential_positive=2",
            "train.batch=4", "train.lr=1e-3", "train.device=cpu", "train.amp=none", "train.threads=1",
            "train.steps=7", "train.checkpoint_every=3", "data.on_bad_sample=skip", f"train.out={out}", *extra]
    code = main([str(HERE.parent / "configs" / "demo.yaml"), *args])
    return code, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_one_record_per_step_with_the_keys_of_before(data, tmp_path):
    _, every4 = _train(data, tmp_path / "a", ["train.log_every=4"])
    _, never = _train(data, tmp_path / "b", ["train.log_every=0"])   # read at checkpoints and the end only
    assert [r["step"] for r in every4] == list(range(8)) == [r["step"] for r in never]
    for r in every4[1:]:
        memory = MEMORY_KEYS if r["step"] > 2 else []
        assert list(r) == KEYS + memory + TIMING + ["bad_samples"]   # the keys, in order, of the per-step read
        assert all(type(r[k]) is float for k in KEYS[1:] + memory if k != "skipped")
        assert type(r["skipped"]) is int and type(r["bad_samples"]) is int
    # the same run, read at other times: the same numbers
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in every4] == \
           [{k: v for k, v in r.items() if k not in TIMING} for r in never]


def test_a_run_that_stops_still_writes_every_step_it_made(data, tmp_path, monkeypatch, capsys):
    # NaN batch losses from step 5 on with train.max_nonfinite=0: the run stops inside step 5, with
    # step 4 not yet read (log_every 0; steps 1-3 were read at the step-3 checkpoint)
    loss = step_module.contrastive_loss
    calls = {"batch": 0}

    def nan_from_step_5(*args, memory=False, **kw):
        value, stats = loss(*args, memory=memory, **kw)
        if not memory:
            calls["batch"] += 1
            if calls["batch"] >= 5:
                value = value * float("nan")
        return value, stats
    monkeypatch.setattr(step_module, "contrastive_loss", nan_from_step_5)
    code, records = _train(data, tmp_path, ["train.log_every=0", "train.max_nonfinite=0"])
    assert code == 2 and "step 5: 1 non-finite losses in a row" in capsys.readouterr().err
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]


def test_records_are_read_before_each_checkpoint(data, tmp_path, monkeypatch):
    """A run killed after a checkpoint (nothing flushed on the way out, as with SIGKILL) and resumed
    has every step once in metrics.jsonl: the steps up to the checkpoint were written when it was
    saved, the resumed run rewrites the rest."""
    import insclr.train.loop as loop

    step = step_module.train_step

    def killed_at_5(state, settings, batch):
        if state.step == 4:
            raise KeyboardInterrupt("killed")
        return step(state, settings, batch)
    monkeypatch.setattr(loop, "train_step", killed_at_5)
    monkeypatch.setattr(loop, "flush_after_error", lambda metrics: None)   # a kill writes nothing more
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path, ["train.log_every=0"])
    monkeypatch.undo()
    code, records = _train(data, tmp_path, ["train.log_every=0"])
    assert code == 0 and [r["step"] for r in records] == list(range(8))


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["none", "v1", "v2"])
def test_cuda_step_synchronises_once_outside_the_mining(version):
    """CUDA's sync debug mode reports each synchronising call as a warning attributed to the Python
    line that made it. A step's own code (insclr/train/step.py) may synchronise once: the finite
    check. The dynamic shapes (the bank's get, the memory loss's kept rows and the sparse
    backward's nonzero in insclr/loss.py) are the mining's and are not counted."""
    state, settings, batch = make_run(version, "cuda", ["train.amp=bf16"])
    for _ in range(2):
        step_module.train_step(state, settings, batch())   # warm-up: cuDNN autotuning, first allocations
    b = batch()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            record = step_module.train_step(state, settings, b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
    allowed = ("insclr/mining/", "insclr/loss.py")
    own = [where for where in syncs if not any(a in where.replace("\\", "/") for a in allowed)]
    assert len(own) == 1 and "insclr/train/step.py" in own[0], f"outside the mining: {own}; all: {syncs}"
    read_records([record])
    assert record["skipped"] == 0
