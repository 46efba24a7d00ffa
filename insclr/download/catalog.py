"""Where each dataset lives on the web and where its files go under --root.

Each dataset is a list of `Item`s. `base` names an entry of BASE_URLS (overridable with
`--base-url KEY=URL`); `path` is appended to it. `to` is where the file lands relative to the
dataset folder (a plain file), or, for an archive, the folder it is extracted into.
"""

from dataclasses import dataclass
from typing import Optional

BASE_URLS = {
    "oxford": "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/",
    "paris": "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/",
    "revisitop": "http://cmp.felk.cvut.cz/revisitop/data/datasets/",
    "r1m": "http://ptak.felk.cvut.cz/revisitop/revisitop1m/",
    "gldv2": "https://s3.amazonaws.com/google-landmark/",
    "instre": "http://123.57.42.89/Dataset_ict/INSTRE/",
    "instre-gnd": "https://cmp.felk.cvut.cz/~iscenahm/files/",
}


@dataclass(frozen=True)
class Item:
    base: str                   # key of BASE_URLS
    path: str                   # appended to the base address
    to: str                     # file (plain) or folder (archive) relative to the dataset folder
    extract: bool = False       # an archive to unpack into `to`
    flatten: str = ""           # after extraction, move files matching this suffix up into `to`
    pick: tuple = ()            # extract only members with these base names, flat into `to`
    md5_path: str = ""          # address (same base) of an md5 list covering this file

    @property
    def name(self):
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Dataset:
    name: str
    folder: str                 # dataset folder under --root (the layout insclr.shard reads)
    fixed: tuple                # items always fetched
    part: Optional[object] = None   # function part number -> Item, for multi-part sets
    parts: tuple = ()           # (first, last) part numbers, inclusive
    about: str = ""             # size, for --list and the docs


def _gld_part(split):
    def item(i):
        return Item("gldv2", f"{split}/images_{i:03d}.tar", split, extract=True,
                    md5_path=f"md5sum/{split}/md5.images_{i:03d}.txt")
    return item


def _r1m_part(i):
    return Item("r1m", f"jpg/revisitop1m.{i}.tar.gz", "jpg", extract=True)


DATASETS = {d.name: d for d in (
    Dataset("roxford5k", "roxford5k", (
        Item("revisitop", "roxford5k/gnd_roxford5k.pkl", "gnd_roxford5k.pkl"),
        Item("oxford", "oxbuild_images-v1.tgz", "jpg", extract=True, flatten=".jpg"),
    ), about="5,062 images (4,993 in the revisited database), 70 queries; one tgz of about 1.8 GB"),
    Dataset("rparis6k", "rparis6k", (
        Item("revisitop", "rparis6k/gnd_rparis6k.pkl", "gnd_rparis6k.pkl"),
        Item("paris", "paris_1-v1.tgz", "jpg", extract=True, flatten=".jpg"),
        Item("paris", "paris_2-v1.tgz", "jpg", extract=True, flatten=".jpg"),
    ), about="6,412 images (6,322 in the revisited database), 70 queries; two tgz, about 2.4 GB together"),
    Dataset("revisitop1m", "revisitop1m", (
        Item("r1m", "revisitop1m.txt", "revisitop1m.txt"),
    ), part=_r1m_part, parts=(1, 100), about="1,001,001 distractor images in 100 tar.gz parts"),
    Dataset("gldv2", "gldv2", (
        Item("gldv2", "metadata/train_clean.csv", "train_clean.csv"),
    ), part=_gld_part("train"), parts=(0, 499),
        about="4.1M train images (1.58M in train_clean) in 500 tars of about 1 GB each"),
    Dataset("gldv2-index", "gldv2", (
        Item("gldv2", "metadata/index_image_to_landmark.csv", "index_image_to_landmark.csv"),
    ), part=_gld_part("index"), parts=(0, 99), about="761,757 index images in 100 tars"),
    Dataset("gldv2-test", "gldv2", (
        Item("gldv2", "ground_truth/retrieval_solution_v2.1.csv", "retrieval_solution_v2.1.csv"),
    ), part=_gld_part("test"), parts=(0, 19), about="117,577 test images in 20 tars"),
    Dataset("instre", "instre", (
        Item("instre-gnd", "test_script.zip", ".", extract=True, pick=("gnd_instre.mat",)),
        Item("instre", "INSTRE_release.rar", ".", extract=True),
    ), about="28,543 images (27,293 database, 1,250 queries); one RAR archive"),
)}


def parse_parts(text, first, last, what):
    """'0-9' or '0,3,5-7' -> sorted part numbers, each within [first, last]."""
    numbers = set()
    for chunk in text.split(","):
        chunk = chunk.strip()
        try:
            lo, _, hi = chunk.partition("-")
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--parts {text!r}: {chunk!r} is not a number or a range a-b") from None
        if lo > hi or lo < first or hi > last:
            raise ValueError(f"--parts {text!r}: {chunk!r} is outside {what}'s parts {first}-{last}")
        numbers.update(range(lo, hi + 1))
    return sorted(numbers)


def items_for(dataset, parts=None):
    """The items to fetch for `dataset`; parts: a --parts string or None (all parts)."""
    items = list(dataset.fixed)
    if dataset.part is not None:
        first, last = dataset.parts
        numbers = parse_parts(parts, first, last, dataset.name) if parts else range(first, last + 1)
        items += [dataset.part(i) for i in numbers]
    return items


def parse_md5_list(text, source):
    """'<md5>  <file name>' lines -> {file name: md5}."""
    sums = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or len(fields[0]) != 32:
            raise ValueError(f"{source}: not an md5 list line: {line!r}")
        sums[fields[1].lstrip("*").rsplit("/", 1)[-1]] = fields[0].lower()
    return sums
