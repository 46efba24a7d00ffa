"""Safe archive extraction: tar (any compression), zip, and RAR (through bsdtar).

Every member is checked before anything is written: an absolute name, a `..` component,
a link whose target leaves the target folder, or a device/FIFO member rejects the whole
archive with an error naming the archive and the member. A `.` member (the archive's own
root, as `tar -C dir .` writes) is the target folder itself and is skipped. Content that cannot
be read (damaged, truncated) is a CorruptArchiveError, so a caller can fetch the archive again.
RAR goes through `bsdtar` (Debian/Ubuntu package `libarchive-tools`): it is extracted into a
staging folder inside the target, the staged tree is checked the same way, and only then moved
into place.
"""

import lzma
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

RAR_TOOL = "bsdtar"
RAR_PACKAGE = "libarchive-tools"


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the target folder."""


class CorruptArchiveError(ValueError):
    """An archive whose content cannot be read (damaged or truncated bytes)."""


def is_root(name):
    """Whether a member name is the archive's root folder itself ('.', './')."""
    return name.replace("\\", "/").rstrip("/") == "."


def check_member_name(archive, name):
    """Raise unless `name` is a relative path that stays inside the target folder."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in clean.split("/"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'")
    if not clean.strip("/").strip("."):
        raise UnsafeArchiveError(f"{archive}: member with an empty name {name!r}")


def check_link(archive, name, target, relative_to_member=True):
    """Raise unless a link named `name` pointing at `target` resolves inside the archive root.

    Symlink targets are relative to the link's folder; hard-link targets to the archive root.
    """
    if target.startswith("/"):
        raise UnsafeArchiveError(f"{archive}: link {name!r} points to the absolute path {target!r}")
    base = posixpath.dirname(name) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: link {name!r} -> {target!r} points outside the target folder")


def _check_tar(archive, members):
    for m in members:
        if m.isdir() and is_root(m.name):
            continue
        check_member_name(archive, m.name)
        if m.issym():
            check_link(archive, m.name, m.linkname)
        elif m.islnk():
            check_member_name(archive, m.linkname)
            check_link(archive, m.name, m.linkname, relative_to_member=False)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or FIFO")


def extract_tar(archive, dest):
    """Extract a (possibly compressed) tar into `dest` after checking every member."""
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        # Reading on to the end of the stream makes gzip/bz2/xz check their checksum: tarfile stops
        # at the first zero block, so damaged bytes there could otherwise pass for the archive's end.
        while tar.fileobj.read(1 << 20):
            pass
        _check_tar(archive, members)
        members = [m for m in members if not (m.isdir() and is_root(m.name))]  # `dest` itself
        # The 'data' filter repeats the checks inside tarfile and drops owners/odd modes.
        tar.extractall(dest, members=members, filter="data")
    return len(members)


def extract_zip(archive, dest):
    """Extract a zip into `dest` after checking every member name (and symlink entries)."""
    with zipfile.ZipFile(archive) as zf:
        infos = [i for i in zf.infolist() if not (i.is_dir() and is_root(i.filename))]
        for info in infos:
            check_member_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                check_link(archive, info.filename, zf.read(info).decode("utf-8", "replace"))
        zf.extractall(dest, members=infos)
    return len(infos)


def _rar_tool():
    tool = shutil.which(RAR_TOOL)
    if tool is None:
        raise RuntimeError(f"extracting RAR archives needs the '{RAR_TOOL}' program: install the "
                           f"package '{RAR_PACKAGE}' (apt-get install {RAR_PACKAGE}; on macOS "
                           f"bsdtar ships with the system), then run the command again")
    return tool


def _check_staged_tree(archive, staging):
    """Reject symlinks in an extracted tree that resolve outside it, and special files."""
    root = os.path.realpath(staging)
    for folder, dirs, files in os.walk(staging):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, staging)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(path)
                if target != root and not target.startswith(root + os.sep):
                    raise UnsafeArchiveError(f"{archive}: link {rel!r} -> {os.readlink(path)!r} "
                                             f"points outside the target folder")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafeArchiveError(f"{archive}: member {rel!r} is a device or FIFO")


def extract_rar(archive, dest):
    """Extract a RAR archive into `dest` with bsdtar, checking names first and links after."""
    tool = _rar_tool()
    listing = subprocess.run([tool, "-tf", str(archive)], capture_output=True, text=True,
                             errors="surrogateescape")
    if listing.returncode != 0:
        raise CorruptArchiveError(f"{archive}: {RAR_TOOL} cannot read it: {listing.stderr.strip()}")
    names = [n for n in listing.stdout.splitlines() if n and not is_root(n)]
    for name in names:
        check_member_name(archive, name)
    dest = Path(dest)
    staging = dest / f".extract-{Path(archive).name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # bsdtar refuses '..' and absolute names by default; --no-same-owner keeps files ours.
        run = subprocess.run([tool, "-xf", str(archive), "-C", str(staging), "--no-same-owner"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            error = CorruptArchiveError if "No space left" not in run.stderr else RuntimeError
            raise error(f"{archive}: {RAR_TOOL} failed: {run.stderr.strip()}")
        _check_staged_tree(archive, staging)
        _merge_into(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(names)


def _merge_into(src, dest):
    """Move the contents of `src` into `dest`, merging folders that already exist."""
    for entry in os.listdir(src):
        s, d = os.path.join(src, entry), os.path.join(dest, entry)
        if os.path.isdir(s) and not os.path.islink(s) and os.path.isdir(d):
            _merge_into(s, d)
        else:
            if os.path.lexists(d) and not os.path.isdir(d):
                os.unlink(d)
            shutil.move(s, d)


def archive_kind(path):
    """'tar', 'zip' or 'rar' from the file name; None for a plain file."""
    name = str(path).lower()
    if name.endswith((".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(".rar"):
        return "rar"
    return None


def extract(archive, dest):
    """Extract `archive` into `dest` (created) safely; returns the number of members."""
    kind = archive_kind(archive)
    if kind is None:
        raise ValueError(f"{archive}: not an archive this tool extracts (tar, tgz, zip, rar)")
    Path(dest).mkdir(parents=True, exist_ok=True)
    try:
        return {"tar": extract_tar, "zip": extract_zip, "rar": extract_rar}[kind](archive, dest)
    except tarfile.FilterError as e:  # tarfile's own safety filter (ours ran first): unsafe, not damaged
        raise UnsafeArchiveError(f"{archive}: {e}") from None
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the system failed (a full disk, permissions), not the archive's bytes
        # (gzip and bz2 raise an OSError without errno for bad data)
        reason = "; ".join(line.strip(" -").rstrip(":") for line in str(e).splitlines() if line.strip(" -:"))
        raise CorruptArchiveError(f"{archive}: damaged or truncated {kind} archive ({reason})") from None
