"""insclr.bench loop: both sides train on the same steps' images; a tiny run of the whole suite."""

import json

import pytest

from insclr.bench import loop

TINY = ["--images", "80", "--steps", "2", "--warmup", "1", "--size", "32", "--noaug-size", "40",
        "--min-side", "96", "--max-side", "160", "--threads", "1", "--arch", "resnet18", "--device", "cpu"]


def tiny_set(tmp_path, extra=()):
    args = loop.build_parser().parse_args(TINY + list(extra) + ["--work", str(tmp_path)])
    cfg = loop.bench_config(args, loop.torch.device("cpu"))
    loop.make_set(tmp_path, args.images, args.min_side, args.max_side, cfg.model.dim)
    return args


@pytest.mark.parametrize("config", [None, "configs/s4_impr.yaml"])
def test_sides_see_the_same_images(tmp_path, config):
    """Same dataset indices per step on both sides (s1-like with bank v1; s4 with the no-aug view,
    selection and bank v2), and every figure present and sane."""
    args = tiny_set(tmp_path, ["--config", config] if config else [])
    ours, base = loop.measure("ours", args), loop.measure("baseline", args)
    assert len(ours["keys"]) == args.warmup + args.steps == len(base["keys"])
    assert ours["keys"] == base["keys"]
    assert all(len(k) == 4 * (1 + 3) for k in ours["keys"])
    for side in (ours, base):
        assert side["images_per_s"] > 0 and 0 <= side["data_wait"] <= 1
        assert side["peak_rss_bytes"] > 100 * 2**20
        assert len(side["step_times_s"]) == args.steps


def test_suite_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "loop.json"
    assert loop.main(TINY + ["--steps", "1", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["suite"] == "loop" and figures["same_keys"] is True
    assert figures["ratio"] == pytest.approx(figures["ours"]["images_per_s"] / figures["baseline"]["images_per_s"])
    assert "original shape" in capsys.readouterr().out


def test_tree_rss_counts_children():
    import subprocess
    import sys
    import time

    alone = loop.tree_rss()
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(30)"])
    try:
        for _ in range(100):
            if loop.tree_rss() > alone + (150 << 20):
                break
            time.sleep(0.1)
        assert loop.tree_rss() > alone + (150 << 20)
    finally:
        child.kill()
        child.wait()


def test_profile_times_every_phase(tmp_path):
    args = tiny_set(tmp_path, ["--config", "configs/s4_impr.yaml", "--steps", "1"])
    prof = loop.profile_phases(args)
    assert set(prof["phases_s"]) == set(loop.PHASES)
    assert all(prof["phases_s"][name] > 0 for name in ("noaug_forward", "forward", "backward", "bank_get",
                                                       "optimizer"))
    assert prof["step_s"] > 0 and prof["steps"] == 1 and prof["memory"] == "v2"


def test_ours_amp_follows_the_device(monkeypatch, tmp_path):
    """--amp auto: bf16 on CUDA and on a CPU with native bfloat16, float32 on other CPUs; the baseline
    always float32; an explicit --amp (or --set train.amp=...) wins."""
    import insclr.amp

    cpu, cuda = loop.torch.device("cpu"), loop.torch.device("cuda")
    for native, expected in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(insclr.amp, "cpu_has_native_bf16", lambda native=native: native)
        assert loop.ours_amp("auto", cpu) == expected
        assert loop.ours_amp("auto", cuda) == "bf16"
        assert loop.ours_amp("none", cpu) == "none"
        args = loop.build_parser().parse_args(TINY + ["--work", str(tmp_path)])
        assert loop.bench_config(args, cpu).train.amp == expected
        args = loop.build_parser().parse_args(TINY + ["--work", str(tmp_path), "--set", "train.amp=fp16"])
        assert loop.bench_config(args, cpu).train.amp == "fp16"
