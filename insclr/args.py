"""Command-line argument types shared by every command, so that bad input stops a command
before any long work, with one `error:` line naming the option and the value.

`Parser` is argparse.ArgumentParser whose errors are that one line (exit status 2) instead of
argparse's usage block. The type helpers check what argparse can check alone (a number's
range, an output path that can be written); each raises argparse.ArgumentTypeError, which
argparse reports with the option's name.
"""

import argparse
import os
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors print `error: <prog>: <message>` on one line and exit 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def at_least(minimum, kind=int):
    """Type: a number >= minimum."""
    def parse(text):
        value = _number(kind, text)
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"{kind.__name__} >= {minimum}"
    return parse


positive_int = at_least(1)
nonnegative_int = at_least(0)


def positive_float(text):
    """Type: a finite number > 0."""
    value = _number(float, text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonnegative_float(text):
    value = _number(float, text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _writable_ancestor(path):
    """The nearest existing ancestor of `path` (which does not exist yet), checked to be a
    folder this process may create entries in."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path}: cannot create it, {parent} is not writable")


def _output(text, folder):
    """`text` if it names an output (a folder if `folder`, else a file) this process can write."""
    path = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    if not path.exists():
        _writable_ancestor(path)
        return text
    if path.is_dir() != folder:
        raise argparse.ArgumentTypeError(f"{path} is a file; give a folder" if folder else
                                         f"{path} is a folder; give the path of the output file")
    # a file is replaced by a rename in its folder (insclr.io.atomic_path): the folder must be writable
    where = path if folder else path.parent
    if not os.access(where, os.W_OK | os.X_OK) or not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path}: not writable")
    return text


def output_file(text):
    """Type: a file path that can be (over)written: not a folder, in a writable place."""
    return _output(text, folder=False)


def output_dir(text):
    """Type: a folder that exists and is writable, or can be created."""
    return _output(text, folder=True)


# Inputs: for arguments that exist before any command of a pipeline runs (a recipe file, say).
# Inputs made by an earlier pipeline stage (features, shards) are checked when the command starts,
# not by argparse: the pipeline parses every stage's arguments when it loads a recipe.


def existing_file(text):
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    return text


def existing_dir(text):
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {'a file, not a folder' if path.exists() else 'no such folder'}")
    return text


def check_output_dir(path, what):
    """The output_dir check for a path that does not come from argparse (a config key such as
    train.out); raises ValueError naming `what`."""
    try:
        output_dir(str(path))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{what}: {e}") from None
