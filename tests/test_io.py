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
