"""python -m insclr.shard --verify on intact and damaged shard folders."""

import io
import shutil
import tarfile

import pytest

import shard_fixtures as fx
from insclr.shard import main, shard_dataset, verify


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    src = fx.make_revisitop(root / "src", n_db=9, n_query=2, bad_db=(), bad_query=())
    shard_dataset("roxford5k", src, root / "shards", per_shard=3)
    return root / "shards"


@pytest.fixture
def shards(intact, tmp_path):
    """A fresh copy of the intact folder to damage."""
    return shutil.copytree(intact, tmp_path / "shards")


def _append_member(tar_path, name, data):
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_intact_folder_passes(intact, capsys):
    assert verify(intact) == []
    assert main(["--verify", str(intact)]) == 0
    assert "OK" in capsys.readouterr().out


def test_flipped_byte(shards, capsys):
    tar = shards / "part-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0x40  # inside the first jpg's data
    tar.write_bytes(bytes(data))
    problems = verify(shards)
    assert len(problems) == 1 and "part-000001.tar" in problems[0] and "sha256" in problems[0]
    assert main(["--verify", str(shards)]) == 1
    assert "part-000001.tar" in capsys.readouterr().err


def test_truncated_tar(shards):
    tar = shards / "part-000002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    problems = verify(shards)
    assert any("part-000002.tar" in p and "sha256" in p for p in problems)
    assert any("part-000002.tar" in p and "truncated" in p for p in problems), problems


def test_missing_member(shards):
    tar = shards / "part-000000.tar"
    with tarfile.open(tar) as src:
        kept = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.name != "000000001.json"]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        for member, data in kept:
            out.addfile(member, io.BytesIO(data))
    problems = verify(shards)
    assert any("part-000000.tar" in p and "000000001" in p and "missing member" in p for p in problems), problems
    assert any("part-000000.idx" in p and "000000001.json" in p for p in problems), problems


def test_duplicate_key_within_and_across_shards(shards):
    _append_member(shards / "part-000001.tar", "000000004.jpg", b"x")  # shard 1 holds 3, 4, 5
    _append_member(shards / "part-000002.tar", "000000000.jpg", b"y")  # shard 0's key in shard 2
    problems = verify(shards)
    assert any("part-000001.tar" in p and "duplicate key" in p and "000000004.jpg" in p for p in problems), problems
    assert any("duplicate key 000000000" in p for p in problems), problems
    assert any("part-000002.tar" in p and "unexpected" in p for p in problems), problems


def test_index_disagrees_with_tar(shards):
    idx = shards / "query-000000.idx"
    lines = idx.read_text().splitlines()
    parts = lines[1].split()
    parts[1] = str(int(parts[1]) + 512)
    lines[1] = " ".join(parts)
    idx.write_text("\n".join(lines) + "\n")
    problems = verify(shards)
    assert any("query-000000.idx" in p and "sha256" in p for p in problems)
    assert any("query-000000.idx" in p and "000000000.jpg at offset" in p for p in problems), problems


def test_missing_shard_and_manifest(shards, tmp_path):
    (shards / "part-000001.tar").unlink()
    problems = verify(shards)
    assert any(p.endswith("part-000001.tar: missing") for p in problems)
    assert any("missing from every shard" in p for p in problems)
    assert "manifest" in verify(tmp_path / "nowhere")[0] or "not found" in verify(tmp_path / "nowhere")[0]
