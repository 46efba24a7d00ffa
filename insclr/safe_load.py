"""Reading files that could have been crafted to run code: torch files and pickles.

Nothing in insclr unpickles arbitrary objects. Torch files (models, checkpoints) are read with
`torch.load(weights_only=True)` (tensors, plain Python containers and numbers only). The
revisitop ground-truth files (`gnd_roxford5k.pkl`, ...) are pickles of dicts, lists, strings
and numpy arrays: `load_pickle` reads them with an unpickler that knows exactly the globals
numpy needs to rebuild an array and refuses any other one, naming the file and the global.
"""

import pickle
import re
from pathlib import Path

# The functions of numpy.core / numpy._core (numpy 1 / 2 paths) that pickles of numpy arrays and
# scalars call (protocols 2 to 5): they only rebuild arrays of a given dtype from bytes.
_NUMPY_GLOBALS = {
    ("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"),
}


# Builtin types a pickle may name (protocol 2 names some by their Python 2 module, __builtin__):
# calling any of them only builds a value.
_BUILTINS = frozenset({"bytes", "bytearray", "set", "frozenset", "complex", "int", "float", "str", "bool",
                       "list", "dict", "tuple"})


def _allowed(module, name):
    import builtins
    import codecs

    import numpy as np

    if module in ("builtins", "__builtin__") and name in _BUILTINS:
        return getattr(builtins, name)
    if (module, name) == ("numpy", "ndarray"):
        return np.ndarray
    if (module, name) == ("numpy", "dtype"):
        return np.dtype
    if (module, name) == ("_codecs", "encode"):  # protocol 2 stores bytes as latin-1 text + encode
        return codecs.encode
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "numpy" and parts[1] in ("core", "_core") and (parts[2], name) in _NUMPY_GLOBALS:
        core = getattr(np, "_core", None) or np.core
        return getattr(getattr(core, parts[2]), name)
    if module == "numpy.dtypes" and re.fullmatch(r"[A-Za-z0-9]+DType", name):  # numpy 2 dtype classes
        import numpy.dtypes

        return getattr(numpy.dtypes, name)
    return None


class UnsafePickle(ValueError):
    """A pickle that refers to a global outside builtin containers and numpy arrays."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise UnsafePickle(f"{self.path}: refers to the Python global {module}.{name}; ground-truth "
                               f"files hold only lists, dicts, strings and numpy arrays, so it is not loaded "
                               f"(the file is damaged or was crafted to run code)")
        return obj


def load_pickle(path):
    """The object in pickle file `path`, built from builtin containers and numpy arrays only.

    Raises FileNotFoundError, UnsafePickle (a forbidden global, nothing of it executed) or
    ValueError (a damaged file), each naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except UnsafePickle:
        raise
    except Exception as e:  # any other unpickling failure means a damaged or foreign file
        raise ValueError(f"{path}: malformed pickle: {type(e).__name__}: {e}") from None


def _numpy_array_globals():
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def torch_load(path, map_location="cpu", what="file", numpy_arrays=False):
    """torch.load(weights_only=True); a file torch cannot read that way is a ValueError naming it
    (UnsafePickle when it names a forbidden global). `numpy_arrays`: also rebuild numpy arrays
    (files of older insclr versions held some; still no code runs)."""
    import contextlib

    import torch

    allow = torch.serialization.safe_globals(_numpy_array_globals()) if numpy_arrays else contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except Exception as e:
        text = str(e).strip()
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text)
        if found:
            raise UnsafePickle(f"{path}: refers to the Python global {found.group(1)}, which a {what} never "
                               f"holds; not loaded (the file is damaged or was crafted to run code)") from None
        # torch's first sentence says what failed; the rest of its message (advice to turn off
        # weights_only) must not be followed for files that could run code
        first = text.splitlines()[0] if text else type(e).__name__
        detail = re.split(r"(?<=\.)\s", first)[0]
        raise ValueError(f"{path}: not a readable {what} (torch.load with weights_only=True: {detail})") from None
