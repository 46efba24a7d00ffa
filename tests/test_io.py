"""insclr.io.print_error: one line for our own input errors, a traceback for anything else."""

import numpy as np
import pytest

from insclr.config import load_config
from insclr.io import print_error


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test hands whatever was raised to print_error
        return e
    raise AssertionError("nothing was raised")


def test_our_error_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("INSCLR_TRACEBACK", raising=False)
    error = _raised(lambda: load_config(str(tmp_path / "missing.yaml"), []))
    print_error(error)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err and "Traceback" not in err


def test_library_error_prints_its_traceback(capsys, monkeypatch):
    monkeypatch.delenv("INSCLR_TRACEBACK", raising=False)
    error = _raised(lambda: np.zeros(3).reshape(2, 2))
    print_error(error)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: cannot reshape")


@pytest.mark.parametrize("flag,shown", [("1", True), ("0", False)])
def test_traceback_on_request(capsys, tmp_path, monkeypatch, flag, shown):
    monkeypatch.setenv("INSCLR_TRACEBACK", flag)
    print_error(_raised(lambda: load_config(str(tmp_path / "missing.yaml"), [])))
    assert ("Traceback" in capsys.readouterr().err) == shown


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_respect_the_umask(tmp_path, umask):
    """Files written through atomic temp files get the mode any new file gets (not mkstemp's 0600)."""
    import os

    import torch

    from insclr.io import save_npy, save_npz, save_torch, write_json
    from insclr.shard.writer import ShardWriter

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {})
        save_npy(tmp_path / "b.npy", np.zeros(2))
        save_npz(tmp_path / "c.npz", x=np.zeros(2))
        save_torch({"x": torch.zeros(2)}, tmp_path / "d.pt")
        with ShardWriter(tmp_path / "part-000000") as w:
            w.write("000000000", {"jpg": b"x"})
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.iterdir())
    assert [p.name for p in files] == ["a.json", "b.npy", "c.npz", "d.pt", "part-000000.idx", "part-000000.tar"]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}
