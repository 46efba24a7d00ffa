"""`verify(out)`: check a shard folder against its manifest; returns the problems found.

Recomputes every tar's and index's sha256, parses every DALI index and compares it with the
tar's actual members (read from the tar headers), checks that the keys of each shard are
exactly first .. first+count-1 in order with a `jpg` and a `json` member each, that every
sample index occurs exactly once across shards, and that each `.json` member names the
sample the manifest lists. Each problem names the file it was found in.
"""

import json
import tarfile
from collections import Counter

from insclr.shard.manifest import Manifest
from insclr.shard.writer import parse_index, sample_key, sha256_file

REQUIRED = ("jpg", "json")


def verify(out):
    """List of problems (strings naming the file) in shard folder `out`; empty means OK."""
    try:
        manifest = Manifest.load(out)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems = []
    for split in manifest.splits:
        try:
            problems += _verify_split(manifest, split)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{manifest.root / 'manifest.json'}: split {split!r} malformed: {e}")
    problems += _verify_ground_truth(manifest)
    return problems


def _verify_split(manifest, split):
    problems, seen = [], Counter()
    n = manifest.num_samples(split)
    entry = manifest.split(split)
    for column in ("ids", "labels", "sizes", "orig_sizes"):
        if len(entry.get(column, [])) != n:
            problems.append(f"{manifest.root / 'manifest.json'}: split {split!r} column {column!r} has "
                            f"{len(entry.get(column, []))} values for {n} samples")
    expected_first = 0
    for shard in manifest.shards(split):
        if shard.first != expected_first:
            problems.append(f"{shard.tar}: manifest says first index {shard.first}, expected {expected_first} "
                            f"(shards must follow each other)")
        expected_first = shard.first + shard.count
        problems += _verify_shard(manifest, split, shard, seen)
    if expected_first != n:
        problems.append(f"{manifest.root / 'manifest.json'}: split {split!r} shards hold {expected_first} "
                        f"samples, num_samples says {n}")
    for index, times in sorted(seen.items()):
        if times > 1:
            problems.append(f"split {split!r}: duplicate key {sample_key(index)} ({times} times across shards)")
    missing = [i for i in range(n) if i not in seen]
    if missing:
        problems.append(f"split {split!r}: {len(missing)} sample index(es) missing from every shard, "
                        f"first {sample_key(missing[0])}")
    return problems


def _verify_shard(manifest, split, shard, seen):
    problems = []
    for path, expected in ((shard.tar, shard.sha256), (shard.idx, shard.idx_sha256)):
        if not path.is_file():
            return problems + [f"{path}: missing"]
        if sha256_file(path) != expected:
            problems.append(f"{path}: sha256 mismatch with manifest (file changed, flipped byte or truncated)")
    try:
        index = parse_index(shard.idx)
    except ValueError as e:
        problems.append(str(e))
        index = None
    members, tar_problems = _read_tar(shard.tar)
    problems += tar_problems
    if members is None:
        return problems
    by_key = {}
    for name in members:
        key, _, ext = name.partition(".")
        by_key.setdefault(key, {})[ext] = members[name]
    keys = list(by_key)
    expected = [sample_key(shard.first + i) for i in range(shard.count)]
    if keys != expected:
        extra = sorted(set(keys) - set(expected))
        lacking = sorted(set(expected) - set(keys))
        problems.append(f"{shard.tar}: keys do not match manifest first={shard.first} count={shard.count}"
                        + (f"; unexpected {extra[:3]}" if extra else "") + (f"; missing {lacking[:3]}" if lacking else "")
                        + ("; out of order" if not extra and not lacking else ""))
    for key, exts in by_key.items():
        if key.isdigit():
            seen[int(key)] += 1
        for ext in REQUIRED:
            if ext not in exts:
                problems.append(f"{shard.tar}: sample {key} has no {ext} member (missing member)")
    if index is not None:
        problems += _compare_index(shard, index, members)
    problems += _check_meta(manifest, split, shard, by_key)
    return problems


def _read_tar(path):
    """({member name: (data offset, size)}, problems) from the tar headers; duplicates reported."""
    members, problems = {}, []
    size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.name in members:
                    problems.append(f"{path}: duplicate key: member {info.name} occurs more than once")
                if info.offset_data + info.size > size:
                    problems.append(f"{path}: member {info.name} ends at byte {info.offset_data + info.size}, "
                                    f"past the end of the file ({size} bytes): truncated tar")
                members[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{path}: unreadable tar ({type(e).__name__}: {e}); truncated or corrupt")
        return (members or None), problems
    return members, problems


def _compare_index(shard, index, members):
    problems = []
    if len(index) != shard.count:
        problems.append(f"{shard.idx}: {len(index)} samples, manifest says {shard.count}")
    listed = set()
    for i, sample in enumerate(index):
        for ext, (offset, size, name) in sample.items():
            listed.add(name)
            if name not in members:
                problems.append(f"{shard.idx}: sample {i} lists {name}, which the tar does not hold (missing member)")
            elif members[name] != (offset, size):
                problems.append(f"{shard.idx}: {name} at offset {offset} size {size}, but the tar has it at "
                                f"offset {members[name][0]} size {members[name][1]}")
    for name in sorted(set(members) - listed):
        problems.append(f"{shard.idx}: tar member {name} is not in the index")
    return problems


def _check_meta(manifest, split, shard, by_key):
    """Each sample's json member names the same index and id as the manifest."""
    problems = []
    ids = manifest.ids(split)
    with open(shard.tar, "rb") as f:
        for key, exts in by_key.items():
            if "json" not in exts or not key.isdigit():
                continue
            offset, size = exts["json"]
            f.seek(offset)
            try:
                meta = json.loads(f.read(size))
                index = int(key)
                ok = meta["index"] == index and index < len(ids) and meta["id"] == ids[index]
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                problems.append(f"{shard.tar}: {key}.json does not match the manifest's sample {key}")
    return problems


def _verify_ground_truth(manifest):
    try:
        gnd = manifest.ground_truth()
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    if gnd is None:
        return []
    path, problems = manifest.root / "ground_truth.json", []
    n_part = manifest.num_samples("part")
    n_query = manifest.num_samples("query") if "query" in manifest.splits else n_part
    if len(gnd.get("gnd", [])) != n_query:
        problems.append(f"{path}: {len(gnd.get('gnd', []))} entries for {n_query} queries")
    for q, g in enumerate(gnd.get("gnd", [])):
        for key in ("easy", "hard", "junk", "ok"):
            bad = [i for i in g.get(key, []) if not 0 <= i < n_part]
            if bad:
                problems.append(f"{path}: gnd[{q}].{key} holds {bad[0]}, outside 0..{n_part - 1}")
    return problems
