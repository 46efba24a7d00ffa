"""Searching a shard folder with a model: `python -m insclr.search index|query`.

`index --model M --shards S [--whiten W] --out IDX` extracts the descriptors of every image
of S (longer side --size, multi-scale as in evaluation), optionally whitens them, and writes
the folder IDX (docs/search_export.md):

    index.json     what made it: model spec and fingerprint, shards identity, size, scales,
                   index kind and parameters, keys count
    keys.json      the shard keys (sample ids) in row order
    features.npy   float16 [N, D] descriptors (L2-normalised, whitened when --whiten)
    index.faiss    exact inner product below --exact-max rows, IVF-PQ above
    whiten.npz     a copy of the whitening, when one was used

`query IDX Q... [--k 10] [--json P] [--html DIR]` ranks the indexed images for each query: an
image file, a folder of images, or a shard key of the indexed folder (its stored descriptor).
"""

import hashlib
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from insclr.io import output_lock, print_error, read_json, save_npy, write_json

FORMAT = "insclr-search/1"
EXACT_MAX = 100_000          # rows up to which the index is exact (flat inner product)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_NPROBE = 16
DEFAULT_REFINE = 10        # IVF-PQ candidates re-scored exactly, per result


# ----------------------------------------------------------------------------- faiss index


def gpu_usable():
    """True when this faiss has GPU support and sees a GPU (faiss-gpu on a CUDA machine)."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivfpq_params(n, dim):
    """(nlist, m, nbits) for n rows of dim: ~4·sqrt(n) lists with ≥ 39 rows each (faiss' k-means
    minimum), m sub-quantisers of ≥ 8 dimensions among the sizes the GPU kernels take, 8 bits per
    code (fewer below 256·39 rows, so that every code book trains on 39 rows per centroid)."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    m = next(m for m in (64, 48, 32, 16, 8, 4, 2, 1) if dim % m == 0 and dim // m >= min(8, dim))
    nbits = max(1, min(8, int(math.log2(max(n / 39, 2)))))
    return nlist, m, nbits


def build_index(features, exact_max=EXACT_MAX, use_gpu=None):
    """features float32 [N, D] (L2-normalised) -> (CPU faiss index holding them, params dict).

    Exact (IndexFlatIP) when N <= exact_max, else IVF-PQ with inner product, trained on the rows
    (on the GPU when faiss-gpu is usable)."""
    import faiss

    n, dim = features.shape
    x = np.ascontiguousarray(features, dtype=np.float32)
    if n <= exact_max:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return index, {"kind": "exact"}
    nlist, m, nbits = ivfpq_params(n, dim)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    use_gpu = gpu_usable() if use_gpu is None else use_gpu
    if use_gpu and nbits == 8:
        gpu, _res = to_gpu(index)
        gpu.train(x)
        gpu.add(x)
        index = faiss.index_gpu_to_cpu(gpu)
    else:
        index.train(x)
        index.add(x)
    return index, {"kind": "ivfpq", "nlist": nlist, "m": m, "nbits": nbits,
                   "nprobe": min(nlist, DEFAULT_NPROBE)}


def to_gpu(index):
    """-> (GPU copy of `index`, its resources object; keep it alive while searching)."""
    import faiss

    res = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # large PQ codes need float16 lookup tables on the GPU
    return faiss.index_cpu_to_gpu(res, 0, index, options), res


class Searcher:
    """A faiss index made ready to search: on the GPU when usable, nprobe set for IVF.

    With `features` (the index's float [N, D] rows, memory-mapped is fine) an IVF-PQ search
    takes `refine`·k candidates from the compressed codes and re-scores them exactly: PQ codes
    rank near neighbours coarsely, the exact dot products order them."""

    def __init__(self, index, nprobe=None, use_gpu=None, features=None, refine=DEFAULT_REFINE):
        import faiss

        self.approximate = isinstance(index, faiss.IndexIVF)
        if self.approximate and nprobe:
            index.nprobe = int(nprobe)
        self.features = features if self.approximate and refine > 1 else None
        self.refine = int(refine)
        self._res = None
        self.device = "cpu"
        if gpu_usable() if use_gpu is None else use_gpu:
            index, self._res = to_gpu(index)
            self.device = "cuda"
        self.index = index

    def search(self, queries, k):
        """queries float [Q, D] -> (scores float32 [Q, k'], rows int64 [Q, k']), k' = min(k, N);
        rows of -1 (an IVF probe found fewer) are left to the caller."""
        k = min(int(k), self.index.ntotal)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.features is None:
            return self.index.search(queries, k)
        _, candidates = self.index.search(queries, min(k * self.refine, self.index.ntotal))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for q, cand in enumerate(candidates):
            cand = cand[cand >= 0]
            exact = np.asarray(self.features[np.sort(cand)], dtype=np.float32) @ queries[q]
            order = np.argsort(-exact, kind="stable")[:k]
            scores[q, :len(order)], rows[q, :len(order)] = exact[order], np.sort(cand)[order]
        return scores, rows


# ----------------------------------------------------------------------------- descriptors


def model_identity(model, scales, size):
    from insclr.evaluate.core import model_fingerprint

    return model_fingerprint(model, scales, size)


def image_descriptor(model, image, size, scales, device, amp="auto", whitening=None):
    """PIL image -> float32 [D] as the index's rows are made: longer side `size` (downscale
    only, PIL's thumbnail size and Lanczos filter like the evaluation loaders), ImageNet
    normalisation, multi-scale GeM descriptor, optional whitening."""
    from insclr.data import normalize
    from insclr.data.resize import lanczos_resize
    from insclr.data.transforms import thumbnail_shape
    from insclr.amp import amp_dtype, autocast
    from insclr.model import multiscale_features

    hwc = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    w, h = thumbnail_shape(hwc.shape[1], hwc.shape[0], size)
    x = normalize(lanczos_resize(hwc, h, w).to(device), channels_last=True)
    # the autocast of insclr.features' extraction (the index's rows): the same strings, the same dtype
    with torch.no_grad(), autocast(device, amp_dtype(amp, device, cuda_auto="fp16", key="amp")):
        f = multiscale_features(model, x, scales).float()
    if whitening is not None:
        from insclr.whiten import apply_whitening

        f = apply_whitening(f, whitening)
    return f[0].cpu().numpy()


def database_features(model, manifest, split, size, scales, device, amp):
    """float32 [N, D] descriptors of every image of `split` (StreamLoader mode 'longest')."""
    from insclr.data import StreamLoader
    from insclr.features import extract

    loader = StreamLoader(manifest, split=split, mode="longest", size=size, device=device)
    return np.asarray(extract(model, loader, scales, device, amp), dtype=np.float32)


# ----------------------------------------------------------------------------- index command


def make_index(args):
    from insclr.features import parse_scales
    from insclr.model import load_model
    from insclr.shard.manifest import Manifest

    scales = parse_scales(args.scales)
    manifest = Manifest.load(args.shards)
    keys = manifest.ids(args.split)
    whitening = None
    if args.whiten:
        from insclr.whiten import load_whitening

        whitening = load_whitening(args.whiten)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = load_model(args.model, args.arch, args.head, args.dim, device=device).eval()
    if whitening is not None and whitening.mean.shape[0] != model.out_dim:
        raise ValueError(f"{args.whiten}: whitening of {whitening.mean.shape[0]}-d descriptors, "
                         f"the model gives {model.out_dim}-d")
    t0 = time.perf_counter()
    features = database_features(model, manifest, args.split, args.size, scales, device, args.amp)
    if whitening is not None:
        from insclr.whiten import apply_whitening

        features = apply_whitening(features, whitening)
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index, params = build_index(features, args.exact_max)
    build_s = time.perf_counter() - t0
    write_index(args, model, manifest, keys, features, index, params, scales, (extract_s, build_s))
    print(f"index: {len(keys)} images, {features.shape[1]}-d, {params['kind']} "
          f"(extract {extract_s:.1f} s, index {build_s:.1f} s) -> {args.out}")
    return 0


def write_index(args, model, manifest, keys, features, index, params, scales, seconds):
    import faiss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "features.npy", features.astype(np.float16))
    faiss.write_index(index, str(out / "index.faiss.tmp"))
    (out / "index.faiss.tmp").replace(out / "index.faiss")
    write_json(out / "keys.json", keys)
    whiten = None
    if args.whiten:
        shutil.copyfile(args.whiten, out / "whiten.npz")
        whiten = {"path": str(Path(args.whiten).resolve()),
                  "sha256": hashlib.sha256(Path(args.whiten).read_bytes()).hexdigest()}
    spec = args.model if args.model in ("imagenet", "random") else str(Path(args.model).resolve())
    write_json(out / "index.json", {
        "format": FORMAT, "model": spec, "arch": model.arch, "head": model.head.kind, "dim": model.out_dim,
        "model_fingerprint": model_identity(model, scales, args.size), "size": args.size,
        "scales": list(scales), "whiten": whiten, "shards": str(Path(args.shards).resolve()),
        "shards_identity": manifest.identity, "split": args.split, "count": len(keys),
        "features_dim": int(features.shape[1]), "index": params,
        "seconds": {"extract": round(seconds[0], 3), "index": round(seconds[1], 3)}})


# ----------------------------------------------------------------------------- query command


class Index:
    """An index folder loaded: info (index.json), keys, features [N, D] float16 (memory-mapped)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / "index.json").is_file():
            raise FileNotFoundError(f"{self.folder}: no index.json (make the index with "
                                    f"`python -m insclr.search index`)")
        self.info = read_json(self.folder / "index.json", what="search index")
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{self.folder / 'index.json'}: format {self.info.get('format')!r} is not {FORMAT!r}")
        self.keys = read_json(self.folder / "keys.json", what="index keys")
        self.features = np.load(self.folder / "features.npy", mmap_mode="r")
        if len(self.keys) != len(self.features) or len(self.keys) != self.info["count"]:
            raise ValueError(f"{self.folder}: keys.json ({len(self.keys)}), features.npy ({len(self.features)}) "
                             f"and index.json count ({self.info['count']}) disagree")
        self.row_of = {k: i for i, k in enumerate(self.keys)}

    def faiss_index(self):
        import faiss

        return faiss.read_index(str(self.folder / "index.faiss"))

    def whitening(self):
        if not self.info.get("whiten"):
            return None
        from insclr.whiten import load_whitening

        return load_whitening(self.folder / "whiten.npz")

    def load_model(self, spec=None, device="cpu"):
        """The model that made the index (its recorded spec, or `spec`), checked by fingerprint:
        ValueError when the weights differ from those the index was made with."""
        from insclr.model import load_model

        info = self.info
        spec = spec or info["model"]
        model = load_model(spec, info["arch"], info["head"], info["dim"], device=device).eval()
        if model_identity(model, info["scales"], info["size"]) != info["model_fingerprint"]:
            raise ValueError(f"{self.folder}: the index was made by another model than {spec} "
                             f"(fingerprint {info['model_fingerprint'][:12]}…); make the index again "
                             f"with this model or query with the one that made it")
        return model


def expand_queries(specs, index):
    """Query arguments -> list of (name, kind, value): ("file", Path) for image files and the
    images of folders (sorted), ("key", row) for shard keys of the index. An existing path wins
    over a key of the same name. ValueError naming the argument for anything else."""
    out = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"query folder {spec}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += [(str(p), "file", p) for p in files]
        elif path.is_file():
            out.append((spec, "file", path))
        elif spec in index.row_of:
            out.append((spec, "key", index.row_of[spec]))
        else:
            raise ValueError(f"query {spec!r}: no such file or folder, and not a key of index {index.folder}")
    return out


def open_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"query {path}: cannot read the image ({e})") from None


def query_descriptors(index, queries, model_spec, device, amp):
    """float32 [Q, D] for the expanded queries (the model is loaded only for image files)."""
    images = {name: open_image(v) for name, kind, v in queries if kind == "file"}  # unreadable: fails first
    model = index.load_model(model_spec, device) if images else None
    whitening = index.whitening()
    rows = []
    for name, kind, value in queries:
        if kind == "key":
            rows.append(np.asarray(index.features[value], dtype=np.float32))
        else:
            rows.append(image_descriptor(model, images[name], index.info["size"], index.info["scales"],
                                         device, amp, whitening))
    return np.stack(rows), images


def run_query(args):
    index = Index(args.index)
    queries = expand_queries(args.queries, index)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    descriptors, images = query_descriptors(index, queries, args.model, device, args.amp)
    searcher = Searcher(index.faiss_index(), args.nprobe or index.info["index"].get("nprobe"),
                        features=index.features, refine=args.refine)
    scores, rows = searcher.search(descriptors, args.k)
    results = []
    for (name, kind, _), s, r in zip(queries, scores, rows):
        hits = [{"rank": j + 1, "key": index.keys[int(i)], "row": int(i), "score": round(float(v), 6)}
                for j, (v, i) in enumerate(zip(s, r)) if i >= 0]
        results.append({"query": name, "kind": kind, "results": hits})
        print(f"{name}")
        for h in hits:
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['key']}")
    if args.json:
        write_json(args.json, {"index": str(index.folder), "k": args.k, "queries": results})
        print(f"wrote {args.json}")
    if args.html:
        from insclr.webpage import search_page

        page = search_page(index, queries, images, results, args.html)
        print(f"wrote {page}")
    return 0


# ----------------------------------------------------------------------------- command line


def _parser():
    from insclr.args import Parser, nonnegative_int, output_dir, output_file, positive_int
    from insclr.features import DEFAULT_SCALES
    from insclr.model import ARCHS, HEADS

    p = Parser(prog="python -m insclr.search", description="Index a shard folder with a model and search it.")
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="build an index of a shard folder")
    ix.add_argument("--model", required=True, help="imagenet | random | PATH of a model file / checkpoint")
    ix.add_argument("--shards", required=True, help="shard folder to index (python -m insclr.shard)")
    ix.add_argument("--whiten", default=None, metavar="W", help="whitening W.npz (python -m insclr.whiten)")
    ix.add_argument("--out", required=True, type=output_dir, help="index folder to write")
    ix.add_argument("--split", default="part", help="split to index (default part)")
    ix.add_argument("--size", type=positive_int, default=1024, help="longer image side (default 1024)")
    ix.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)), help="comma-separated scales")
    ix.add_argument("--exact-max", type=nonnegative_int, default=EXACT_MAX,
                    help=f"largest row count indexed exactly; IVF-PQ above (default {EXACT_MAX})")
    ix.add_argument("--arch", default=None, choices=sorted(ARCHS), help="imagenet/random only")
    ix.add_argument("--head", default=None, choices=HEADS, help="imagenet/random only")
    ix.add_argument("--dim", type=positive_int, default=None, help="imagenet/random only")
    q = sub.add_parser("query", help="rank the indexed images for query images or keys")
    q.add_argument("index", help="index folder (python -m insclr.search index)")
    q.add_argument("queries", nargs="+", metavar="QUERY", help="image file, folder of images, or shard key")
    q.add_argument("--k", type=positive_int, default=10, help="results per query (default 10)")
    q.add_argument("--json", default=None, metavar="P", type=output_file, help="write the results as JSON")
    q.add_argument("--html", default=None, metavar="DIR", type=output_dir, help="write a results page")
    q.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists visited (default: the index's)")
    q.add_argument("--refine", type=positive_int, default=DEFAULT_REFINE,
                   help=f"IVF-PQ: re-score refine·k candidates exactly, 1 = codes only (default {DEFAULT_REFINE})")
    q.add_argument("--model", default=None,
                   help="model file to embed image queries (default: the one recorded in the index)")
    for s in (ix, q):
        s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        s.add_argument("--amp", default="auto", choices=("auto", "fp16", "bf16", "none"))
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "index":
            with output_lock(args.out):
                return make_index(args)
        return run_query(args)
    except (OSError, ValueError) as e:
        print_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
