"""Really damaged shard folders for the fault tests: copies of a good folder with bytes flipped,
index files swapped, a tar truncated or an index removed (the damage a disk or a user does)."""

import shutil

from insclr.shard.writer import parse_index


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def member(root, shard, j, ext="jpg"):
    """(tar path, offset, size) of member `ext` of the j-th sample of shard `shard` (a stem, e.g. part-000001)."""
    offset, size, _ = parse_index(root / f"{shard}.idx")[j][ext]
    return root / f"{shard}.tar", offset, size


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_jpeg_header(root, shard, j, start=2, count=24):
    """XOR bytes start..start+count of the sample's JPEG with 0xFF (start 2: just after SOI)."""
    tar, offset, _ = member(root, shard, j)
    with open(tar, "rb") as f:
        f.seek(offset + start)
        old = f.read(count)
    patch(tar, offset + start, bytes(b ^ 0xFF for b in old))


def damage_quantisation_table(root, shard, j):
    """A well-formed header that names a quantisation table that does not exist: the header
    check passes, the decoder itself fails (libjpeg: 'Bogus DQT index')."""
    tar, offset, size = member(root, shard, j)
    with open(tar, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    at = data.index(b"\xff\xdb")
    patch(tar, offset + at + 4, b"\x7f")  # Pq/Tq byte of the first DQT segment


def swap_indexes(root, a, b):
    ia, ib = root / f"{a}.idx", root / f"{b}.idx"
    da, db = ia.read_bytes(), ib.read_bytes()
    ia.write_bytes(db)
    ib.write_bytes(da)


def truncate(root, shard, keep=0.5):
    tar = root / f"{shard}.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:int(len(data) * keep)])


def remove_index(root, shard):
    (root / f"{shard}.idx").unlink()
