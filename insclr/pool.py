"""The candidate pool (ALGORITHM §3): exact inner-product kNN of every image against all images.

`knn(features, k)` -> neighbors int32 [N, k], similarities float32 [N, k], by descending
similarity, the query's own index excluded explicitly (duplicates of it stay in). Two exact
back ends give the same answer: faiss IndexFlatIP (on all GPUs when faiss-gpu is importable
and usable, else faiss-cpu) and a chunked torch matmul + topk (usable on a GPU without faiss-gpu).

Ties are broken the same way in both: lower index first. Each chunk asks for k + 1 + TIE_PAD
candidates and re-sorts them by (-similarity, index), so only ties spanning more than TIE_PAD
places at the k-th position could still depend on the back end.

Peak memory, N samples of dimension D, chunk of Q queries (M = k + 1 + TIE_PAD):
  - the database as float32, once: N·D·4 bytes (inside the faiss index, in RAM or split over
    the GPUs; or the torch tensor on the device), plus the float16 features (N·D·2, a memory
    map from the CLI);
  - per chunk: faiss Q·M·12 bytes of results (+ faiss's fixed BLAS block buffer, ~16 MB);
    torch Q·N·4 bytes of similarities (+ the same again transiently inside topk);
  - the output: N·k·8 bytes (int32 + float32; N·k·6 with --dtype float16).
Default chunks: torch keeps Q·N ≤ 2^26 (256 MB of similarities); faiss Q = 16384 (~100 MB
of results at k = 500).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from insclr.io import output_lock, print_error, progress, save_npz, write_json

TIE_PAD = 16
FAISS_CHUNK = 16384
ADD_ROWS = 1 << 16  # rows converted to float32 (or checked) at a time
PRECISION_AT = (1, 3, 10, 50)


# ----------------------------------------------------------------------------- pure parts


def check_finite(features, source="features"):
    """Raise ValueError naming `source` and the first row with a NaN or infinity."""
    for start in range(0, len(features), ADD_ROWS):  # in blocks: features may be a memory map
        bad = ~np.isfinite(features[start:start + ADD_ROWS]).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise ValueError(f"{source}: row {row} is not finite (NaN or infinity); re-extract the features")


def default_chunk(n, backend="torch"):
    """Queries per chunk. torch: a chunk's Q×N float32 similarities stay within 256 MB.
    faiss blocks the similarities itself, so a chunk only bounds its Q×M results (~100 MB)
    and large chunks keep the GPUs busy."""
    if backend == "faiss":
        return FAISS_CHUNK
    return int(min(8192, max(16, (1 << 26) // max(n, 1))))


def exclude_self_topk(sims, idx, rows, k):
    """From M ≥ k+1 candidates per query, keep the best k that are not the query itself.

    sims float [Q, M], idx int64 [Q, M] (any order), rows int64 [Q] (the queries' own indices).
    Sorted by descending similarity, ties by ascending index; the column equal to the row's own
    index is dropped, else the last one. Returns (idx int64 [Q, k], sims float [Q, k]).
    """
    by_index = torch.argsort(idx, dim=1, stable=True)
    idx, sims = idx.gather(1, by_index), sims.gather(1, by_index)
    by_sim = torch.argsort(sims, dim=1, descending=True, stable=True)
    idx, sims = idx.gather(1, by_sim), sims.gather(1, by_sim)
    is_self = (idx == rows[:, None]).to(torch.int8)
    keep = torch.argsort(is_self, dim=1, stable=True)[:, :k]  # non-self columns first, in order
    keep = keep.sort(dim=1).values
    return idx.gather(1, keep), sims.gather(1, keep)


def neighbor_precision(neighbors, labels, ks=PRECISION_AT):
    """Mean fraction of the first k neighbours sharing the query's label, over labelled queries.

    neighbors int [N, K], labels int [N] (-1 = unknown). Returns {k: precision} for k ≤ K.
    """
    labels = np.asarray(labels)
    known = labels >= 0
    if not known.any():
        return {}
    out = {}
    for k in ks:
        if k <= neighbors.shape[1]:
            same = labels[neighbors[known, :k]] == labels[known, None]
            out[k] = float(same.mean())
    return out


# ----------------------------------------------------------------------------- back ends


def _faiss():
    try:
        import faiss
        return faiss
    except ImportError:
        return None


def _faiss_gpu_usable(faiss):
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def pick_backend(backend="auto"):
    """auto: faiss on the GPUs > torch on a GPU (no faiss-gpu) > faiss-cpu > torch on the CPU."""
    faiss = _faiss()
    if backend == "auto":
        if _faiss_gpu_usable(faiss):
            return "faiss"
        if torch.cuda.is_available() or faiss is None:
            return "torch"
        return "faiss"
    if backend == "faiss" and faiss is None:
        raise RuntimeError("pool backend 'faiss' asked for, but faiss is not installed "
                           "(pip install faiss-cpu, or faiss-gpu)")
    if backend not in ("faiss", "torch"):
        raise ValueError(f"pool backend {backend!r} is not one of auto, faiss, torch")
    return backend


def _float32(rows):
    return np.ascontiguousarray(rows, dtype=np.float32)


def _faiss_search(features, m):
    """A search(queries float32 [Q, D]) -> (sims, idx) function over `features` [N, D]."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(features.shape[1])
    if _faiss_gpu_usable(faiss):
        try:
            index = faiss.index_cpu_to_all_gpus(index)
        except Exception as e:  # a faiss-gpu build that cannot start: the CPU index is still exact
            print(f"pool: faiss GPU index unusable ({e}); using faiss-cpu", file=sys.stderr)
    for start in range(0, len(features), ADD_ROWS):  # no second full float32 copy besides faiss's
        index.add(_float32(features[start:start + ADD_ROWS]))

    def search(queries):
        sims, idx = index.search(queries, m)
        return torch.from_numpy(sims), torch.from_numpy(idx)
    return search


def _torch_search(features, m, device):
    base = torch.empty(features.shape, dtype=torch.float32, device=device)
    for start in range(0, len(features), ADD_ROWS):
        base[start:start + ADD_ROWS] = torch.from_numpy(_float32(features[start:start + ADD_ROWS]))

    def search(queries):
        sims = torch.from_numpy(queries).to(device) @ base.T
        top = sims.topk(m, dim=1)
        return top.values.cpu(), top.indices.cpu()
    return search


def make_search(features, k, backend="auto", device=None):
    """(backend, search): search(queries float32 [Q, D]) -> (sims [Q, M], idx [Q, M]) with
    M = min(N, k + 1 + TIE_PAD) best candidates over all N rows, in no particular tie order."""
    n = len(features)
    if not 0 < k <= n - 1:
        raise ValueError(f"k={k} must be between 1 and N-1 = {n - 1} (N = {n} samples)")
    m = min(n, k + 1 + TIE_PAD)
    backend = pick_backend(backend)
    if backend == "faiss":
        search = _faiss_search(features, m)
    else:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        search = _torch_search(features, m, device)
    search.default_chunk = default_chunk(n, backend)
    return backend, search


def knn_rows(search, features, k, start, stop, chunk=None, bar=None, dtype=np.float32):
    """Neighbours of rows start..stop-1 (int32 [Q, k], `dtype` [Q, k]) through `search`."""
    chunk = chunk or getattr(search, "default_chunk", None) or default_chunk(len(features))
    neighbors = np.empty((stop - start, k), dtype=np.int32)
    similarities = np.empty((stop - start, k), dtype=dtype)
    for a in range(start, stop, chunk):
        b = min(stop, a + chunk)
        sims, idx = search(_float32(features[a:b]))
        rows = torch.arange(a, b, dtype=torch.int64)
        idx, sims = exclude_self_topk(sims.float(), idx.long(), rows, k)
        neighbors[a - start:b - start] = idx.numpy()
        similarities[a - start:b - start] = sims.numpy()
        if bar is not None:
            bar.update(b - a)
    return neighbors, similarities


def knn(features, k=500, chunk=None, backend="auto", device=None, show=False, source="features",
        dtype=np.float32):
    """Exact inner-product kNN of every row against all rows, the row itself excluded.

    features: [N, D] (float16/float32, L2-normalised; a memory map is fine). Returns neighbors
    int32 [N, k] and similarities `dtype` [N, k] (computed in float32; float16 storage moves
    values near the bank-v2 cuts across them), descending, ties by ascending index.
    """
    check_finite(features, source)
    backend, search = make_search(features, k, backend, device)
    n = len(features)
    with progress(total=n, desc=f"knn ({backend})", disable=None if show else True) as bar:
        return knn_rows(search, features, k, 0, n, chunk, bar, dtype)


# ----------------------------------------------------------------------------- command line


def _parser():
    from insclr.args import Parser, output_file, positive_int

    p = Parser(prog="python -m insclr.pool", description="Exact kNN candidate pool of a features.npy (ALGORITHM §3).")
    p.add_argument("--features", required=True, help="features.npy from python -m insclr.features")
    p.add_argument("--out", required=True, type=output_file,
                   help="output pool.npz (a pool.json summary is written beside it)")
    p.add_argument("--k", type=positive_int, default=500, help="neighbours per image (default 500)")
    p.add_argument("--chunk", type=positive_int, default=None,
                   help="queries per chunk (default: torch Q·N ≤ 2^26, faiss 16384)")
    p.add_argument("--backend", default="auto", choices=("auto", "faiss", "torch"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="stored similarities (default float32; float16 halves them and moves values across "
                        "the bank-v2 cuts, docs/features_pool.md)")
    p.add_argument("--device", default=None, help="torch back end device (default: cuda if present)")
    p.add_argument("--shards", default=None,
                   help="shard folder of the features: check they were made from it, report neighbour "
                        "precision at 1/3/10/50 when it has labels")
    return p


def features_source(path):
    """What features.json beside `path` says the features were made from: {"shards": folder,
    "shards_identity": ..., "split": ...}, or {} for features of an older version (no record)."""
    from insclr.io import read_json

    meta = Path(path).with_suffix(".json")
    if not meta.is_file():
        return {}
    info = read_json(meta, what="features summary")
    return {k: info[k] for k in ("shards", "shards_identity", "split") if k in info}


def check_source(what, path, source, manifest, split="part"):
    """Refuse `path` (features or pool) made from another shard folder than `manifest`: both named."""
    identity = source.get("shards_identity")
    if identity is None:
        return
    if identity != manifest.identity or source.get("split", split) != split:
        raise ValueError(f"{path}: {what} made from {source.get('shards')} (split {source.get('split', split)!r}), "
                         f"not from {manifest.root} (split {split!r}): their shard identities differ "
                         f"({identity[:12]} vs {manifest.identity[:12]}); remake it from {manifest.root}")


def read_pool(path, manifest=None):
    """(neighbors [N, k], similarities [N, k], source dict) of pool.npz, refused when unreadable, with
    NaN similarities, with a row listing itself, or (given `manifest`) made from another shard folder."""
    import zipfile

    path = Path(path)
    try:
        with np.load(path) as z:
            missing = {"neighbors", "similarities"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a candidate pool, missing arrays {sorted(missing)}")
            neighbors, similarities = z["neighbors"], z["similarities"]
            source = {k: str(z[k]) for k in ("shards", "shards_identity", "split") if k in z.files}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: not a readable candidate pool (.npz from python -m insclr.pool): {e}") from None
    if neighbors.ndim != 2 or neighbors.shape != similarities.shape:
        raise ValueError(f"{path}: neighbors {neighbors.shape} and similarities {similarities.shape} must be "
                         f"two [N, k] arrays")
    for start in range(0, len(neighbors), ADD_ROWS):  # in blocks: pools of a million rows
        stop = start + ADD_ROWS
        bad = ~np.isfinite(similarities[start:stop]).all(axis=1)
        if bad.any():
            raise ValueError(f"{path}: row {start + int(np.argmax(bad))} has NaN or infinite similarities; "
                             f"remake the pool (python -m insclr.pool) from finite features")
        own = (neighbors[start:stop] == np.arange(start, start + len(neighbors[start:stop]))[:, None]).any(axis=1)
        if own.any():
            raise ValueError(f"{path}: row {start + int(np.argmax(own))} lists itself as a neighbour; a candidate "
                             f"pool never does (python -m insclr.pool)")
    if manifest is not None:
        check_source("candidate pool", path, source, manifest)
    return neighbors, similarities, source.get("shards_identity")


def load_features(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path} (make it with python -m insclr.features)")
    try:
        features = np.load(path, mmap_mode="r")
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy features file (python -m insclr.features): {e}") from None
    if not isinstance(features, np.ndarray):
        raise ValueError(f"{path}: an .npz archive, not the .npy array python -m insclr.features writes")
    if features.ndim != 2:
        raise ValueError(f"{path}: expected a 2-d [N, D] array, got shape {features.shape}")
    return features


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        with output_lock(args.out):
            return run(args)
    except (OSError, ValueError, RuntimeError) as e:
        print_error(e)
        return 2


def run(args):
    features = load_features(args.features)
    source = features_source(args.features)
    labels = None
    if args.shards:
        from insclr.shard.manifest import Manifest

        manifest = Manifest.load(args.shards)
        check_source("features", args.features, source, manifest)
        labels = manifest.labels("part")
        if len(labels) != len(features):
            raise ValueError(f"{args.shards}: {len(labels)} samples but {args.features} has "
                             f"{len(features)} rows")
    if not 0 < args.k <= len(features) - 1:
        raise ValueError(f"--k {args.k}: must be between 1 and N-1 = {len(features) - 1} ({args.features} "
                         f"has {len(features)} rows)")
    t0 = time.perf_counter()
    backend = pick_backend(args.backend)
    neighbors, similarities = knn(features, args.k, args.chunk, backend, args.device, show=True,
                                  source=str(args.features), dtype=np.dtype(args.dtype))
    seconds = time.perf_counter() - t0
    # the pool carries the identity of the shards its features came from (checked by training)
    save_npz(args.out, neighbors=neighbors, similarities=similarities, **{k: np.array(v) for k, v in source.items()})
    summary = {"features": str(args.features), "num_samples": len(features), "k": args.k,
               "backend": backend, "dtype": args.dtype, "seconds": round(seconds, 3), **source}
    print(f"pool: {len(features)} x {args.k} neighbours in {seconds:.1f} s ({backend}) -> {args.out}")
    if labels is not None:
        precision = neighbor_precision(neighbors, labels)
        summary["precision"] = {str(k): v for k, v in precision.items()}
        for k, v in precision.items():
            print(f"  neighbour precision@{k}: {v:.4f}")
        if not precision:
            print("  (no labels in the manifest: no neighbour precision)")
    write_json(Path(args.out).with_suffix(".json"), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
