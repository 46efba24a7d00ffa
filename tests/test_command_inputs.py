"""Every command refuses bad inputs and outputs up front, with one `error:` line and status 2."""

import json

import pytest

from data_shards import make_shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small shard folder with a query split, a file and a folder to misuse as outputs."""
    root = tmp_path_factory.mktemp("inputs")
    make_shards(root / "shards", n=8, per_shard=4, queries=2)
    make_shards(root / "train", n=8, per_shard=4, queries=0)
    (root / "a_file").write_text("x")
    (root / "a_folder").mkdir()
    return root


def _commands(root):
    """{case: (command module, arguments, what the error line says)}."""
    f, d = root / "a_file", root / "a_folder"
    feat = ["--shards", root / "shards", "--model", "random"]
    out = ["--out", root / "x.npy"]
    return {
        "features --out folder": ("insclr.features", feat + ["--out", d], "is a folder"),
        "features --out under a file": ("insclr.features", feat + ["--out", f / "x.npy"], "is a file, not a folder"),
        "features --batch 0": ("insclr.features", feat + out + ["--batch", "0"], "argument --batch: must be >= 1"),
        "features --threads 0": ("insclr.features", feat + out + ["--threads", "0"], "--threads: must be >= 1"),
        "features --size -5": ("insclr.features", feat + out + ["--size", "-5"], "--size: must be >= 1, got '-5'"),
        "pool --k 0": ("insclr.pool", ["--features", f, "--out", root / "p.npz", "--k", "0"], "--k: must be >= 1"),
        "pool --out folder": ("insclr.pool", ["--features", f, "--out", d], "is a folder"),
        "pool --features missing": ("insclr.pool", ["--features", root / "nope.npy", "--out", root / "p.npz"],
                                    "features file not found"),
        "shard --out file": ("insclr.shard", ["folder", "--src", d, "--out", f], "is a file; give a folder"),
        "shard --per-shard 0": ("insclr.shard", ["folder", "--src", d, "--out", root / "o", "--per-shard", "0"],
                                "--per-shard: must be >= 1"),
        "shard --workers 0": ("insclr.shard", ["folder", "--src", d, "--out", root / "o", "--workers", "0"],
                              "--workers: must be >= 1"),
        "evaluate --size -5": ("insclr.evaluate", ["--model", "random", "--size", "-5"], "--size: must be >= 1"),
        "evaluate --json folder": ("insclr.evaluate", ["--model", "random", "--json", d], "is a folder"),
        "synth --root file": ("insclr.synth", ["--root", f], "is a file; give a folder"),
        "synth --workers 0": ("insclr.synth", ["--root", root / "s", "--workers", "0"], "--workers: must be >= 1"),
        "pipeline --nproc 0": ("insclr.pipeline", ["recipe.yaml", "--nproc", "0"], "--nproc: must be >= 1"),
        "pipeline --runs-root file": ("insclr.pipeline", ["recipe.yaml", "--runs-root", f], "is a file"),
        "download --timeout 0": ("insclr.download", ["roxford5k", "--timeout", "0"], "--timeout: must be a number > 0"),
        "bench --repeats 0": ("insclr.bench", ["loader", "--repeats", "0"], "--repeats: must be >= 1"),
        "bench --batch 0": ("insclr.bench", ["loader", "--batch", "0"], "--batch: must be >= 1"),
        "bench --json folder": ("insclr.bench", ["pool", "--json", d], "is a folder"),
        "search index --out file": ("insclr.search", ["index", "--model", "random", "--shards", root / "shards",
                                                      "--out", f], "is a file; give a folder"),
        "search index shards missing": ("insclr.search", ["index", "--model", "random", "--shards", root / "nope",
                                                          "--out", root / "idx"], "shard folder not found"),
        "search query --k 0": ("insclr.search", ["query", d, "x", "--k", "0"], "--k: must be >= 1"),
        "search query not an index": ("insclr.search", ["query", d, "x"], "no index.json"),
        "export --out folder": ("insclr.export", ["--model", "random", "--format", "onnx", "--out", d], "is a folder"),
        "export --format bad": ("insclr.export", ["--model", "random", "--format", "tf", "--out", f], "invalid choice"),
        "evaluate --html file": ("insclr.evaluate", ["--model", "random", "--html", f], "is a file; give a folder"),
        "plot metrics missing": ("insclr.plot", [root / "nope"], "no such metrics file"),
        "demo --recipe missing": ("insclr.demo", ["--recipe", root / "nope.yaml"], "no such file"),
        "train config missing": ("insclr.train", [root / "nope.yaml"], "config file not found"),
    }


CASES = sorted(_commands(__import__("pathlib").Path("/x")))


def _main(module):
    import importlib

    return importlib.import_module(module).main


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_one_error_line_and_status_2(folder, capsys, case):
    module, args, expected = _commands(folder)[case]
    try:
        rc = _main(module)([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_features_of_a_missing_split_is_refused_before_extraction(folder, capsys):
    from insclr.features import main

    assert main(["--shards", str(folder / "train"), "--model", "random", "--out", str(folder / "q.npy"),
                 "--split", "query"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {folder / 'train' / 'manifest.json'}: no split 'query' (has part)"


def test_training_output_that_is_a_file_is_refused(folder, capsys):
    from pathlib import Path

    from insclr.train import main

    config = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    assert main([str(config), f"train.out={folder / 'a_file'}", "train.device=cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"error: train.out: {folder / 'a_file'} is a file; give a folder"


@pytest.mark.parametrize("edit, expected", [
    (lambda g: g["gnd"][0]["easy"].append(99), "'easy' holds index 99, outside the 8 database images"),
    (lambda g: g["gnd"][1].update(junk=[-1]), "'junk' holds index -1"),
    (lambda g: g["gnd"][0].update(bbx=[1, 2]), "'bbx' must be 4 numbers"),
    (lambda g: g["gnd"].pop(), "1 entries for 2 query samples"),
])
def test_ground_truth_out_of_range_is_refused_before_extraction(folder, tmp_path, capsys, edit, expected):
    import shutil

    from insclr.evaluate.cli import main

    root = tmp_path / "roxford5k"
    shutil.copytree(folder / "shards", root)
    gt = json.loads((root / "ground_truth.json").read_text())
    edit(gt)
    (root / "ground_truth.json").write_text(json.dumps(gt))
    assert main(["--model", "random", "--arch", "resnet18", "--data", "roxford5k", "--shards-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {root / 'ground_truth.json'}: ") and expected in err[0]
