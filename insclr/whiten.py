"""Whitening of descriptors: PCA-whitening, and cirtorch's learned whitening without labels.

`python -m insclr.whiten --features F.npy (--pca D | --pool pool.npz [--thresh T] [--k K]) --out W.npz`

W.npz (the file every consumer reads through `load_whitening` / `apply_whitening`):
  mean        float32 [D_in]           subtracted first
  projection  float32 [D_out, D_in]    rows by decreasing importance: the first d rows are the
                                       d-dimensional whitening (`apply_whitening(..., dim=d)`)
  kind        str                      "pca" | "learned"
  renormalize bool                     L2-normalise the output (always True for this command)
  and, for the record: source (features path), count (rows fitted on), shards_identity (of the
  features, when known), pairs / k / thresh / shrink (learned only).
apply: y = normalize((x − mean) · projection[:d]ᵀ).

Learned whitening (Radenović et al., TPAMI 2018, §3.2): whiten the intra-class covariance of
matching pairs, C_S = Σ (x_i − x_j)(x_i − x_j)ᵀ / |P|, then rotate by the PCA of the inter-class
covariance of the whitened vectors. Our pairs are not labelled: they are the mutual k-nearest
neighbours of the candidate pool whose similarity is at least `thresh` (`mutual_pairs`).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROWS = 1 << 16   # rows per block: features may be a 1M-row memory map


@dataclass
class Whitening:
    mean: np.ndarray          # float32 [D_in]
    projection: np.ndarray    # float32 [D_out, D_in]
    kind: str = "pca"
    renormalize: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def dim(self):
        return self.projection.shape[0]


def _blocks(features):
    for start in range(0, len(features), ROWS):
        yield torch.from_numpy(np.asarray(features[start:start + ROWS], dtype=np.float64))


def _mean_cov(features):
    """Mean [D] and covariance [D, D] (float64, divided by N − 1 as sklearn's PCA) in row blocks."""
    n = len(features)
    mean = sum(b.sum(0) for b in _blocks(features)) / n
    cov = sum((b - mean).T @ (b - mean) for b in _blocks(features)) / max(n - 1, 1)
    return mean, cov


def _descending_eigh(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0), vectors.flip(1)


def pca_whitening(features, dim=None, eps=1e-9):
    """PCA-whitening fitted on features [N, D] -> (mean [D], projection [d, D]) float64 tensors:
    projection = diag(λ + eps)^-1/2 Vᵀ over the top-d eigenpairs of the covariance (as
    sklearn's `PCA(whiten=True)`, up to the components' signs). d ≤ N − 1 (the data's rank)."""
    n, d_in = features.shape
    dim = d_in if dim is None else int(dim)
    if not 0 < dim <= min(d_in, n - 1):
        raise ValueError(f"PCA to {dim} dimensions needs 0 < dim <= min(D={d_in}, N-1={n - 1})")
    mean, cov = _mean_cov(features)
    values, vectors = _descending_eigh(cov)
    return mean, (vectors[:, :dim] / (values[:dim].clamp(min=0) + eps).sqrt()).T


def mutual_pairs(neighbors, similarities, k=5, thresh=0.7):
    """Pairs (i, j), i < j, each among the other's first k pool neighbours with similarity ≥ thresh
    -> int64 [P, 2]. neighbors int [N, K], similarities [N, K] (a candidate pool)."""
    nb = np.asarray(neighbors)[:, :k].astype(np.int64)
    sim = np.asarray(similarities)[:, :k].astype(np.float32)
    n = len(nb)
    rows = np.repeat(np.arange(n, dtype=np.int64), nb.shape[1])
    cols, keep = nb.reshape(-1), sim.reshape(-1) >= thresh
    rows, cols = rows[keep], cols[keep]
    edges = np.unique(rows * n + cols)
    mutual = np.isin(cols * n + rows, edges, assume_unique=False) & (rows < cols)
    return np.stack([rows[mutual], cols[mutual]], 1)


def learned_whitening(features, pairs, dim=None, shrink=0.1):
    """Learned whitening from matching pairs -> (mean [D], projection [d, D]) float64 tensors.

    features [N, D]; pairs int [P, 2]. mean: of the paired vectors. The intra-class covariance is
    shrunk towards its mean eigenvalue, (1 − shrink)·C_S + shrink·tr(C_S)/D·I, because a few
    hundred or thousand pairs cannot determine a D × D covariance (cirtorch has no shrinkage).
    """
    pairs = np.asarray(pairs, dtype=np.int64)
    d_in = features.shape[1]
    dim = d_in if dim is None else int(dim)
    if len(pairs) < 2:
        raise ValueError(f"learned whitening needs at least 2 matching pairs, got {len(pairs)}: lower --thresh "
                         f"or raise --k")
    if not 0 < dim <= d_in:
        raise ValueError(f"--dim {dim}: must be in 1..{d_in}")
    members = np.unique(pairs)
    mean = sum(b.sum(0) for b in _blocks(features[members])) / len(members)
    intra = torch.zeros(d_in, d_in, dtype=torch.float64)
    for start in range(0, len(pairs), ROWS):
        p = pairs[start:start + ROWS]
        diff = torch.from_numpy(np.asarray(features[p[:, 0]], np.float64) - np.asarray(features[p[:, 1]], np.float64))
        intra += diff.T @ diff
    intra /= len(pairs)
    intra = (1 - shrink) * intra + shrink * torch.trace(intra) / d_in * torch.eye(d_in, dtype=torch.float64)
    values, vectors = _descending_eigh(intra)
    inv_sqrt = vectors / values.clamp(min=1e-12).sqrt() @ vectors.T      # C_S^-1/2
    inter = sum(((b - mean) @ inv_sqrt).T @ ((b - mean) @ inv_sqrt) for b in _blocks(features)) / len(features)
    _, rotation = _descending_eigh(inter)
    return mean, rotation[:, :dim].T @ inv_sqrt


# ----------------------------------------------------------------------------- the W.npz contract


def save_whitening(path, mean, projection, kind, renormalize=True, **meta):
    from insclr.io import save_npz

    extra = {k: np.array(v) for k, v in meta.items() if v is not None}
    save_npz(path, mean=np.asarray(mean, np.float32), projection=np.asarray(projection, np.float32),
             kind=np.array(kind), renormalize=np.array(bool(renormalize)), **extra)


def load_whitening(path):
    """W.npz -> Whitening; ValueError / FileNotFoundError naming the file and the bad array."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"whitening file not found: {path} (make it with python -m insclr.whiten)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"mean", "projection"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a whitening file, missing arrays {sorted(missing)}")
            arrays = {k: z[k] for k in z.files}
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable whitening .npz (python -m insclr.whiten): {e}") from None
    mean, projection = arrays.pop("mean"), arrays.pop("projection")
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0]:
        raise ValueError(f"{path}: mean {mean.shape} and projection {projection.shape} must be [D] and [d, D]")
    if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
        raise ValueError(f"{path}: mean or projection is not finite")
    kind = str(arrays.pop("kind", "pca"))
    renormalize = bool(arrays.pop("renormalize", True))
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), kind, renormalize,
                     {k: v.item() if v.ndim == 0 else v.tolist() for k, v in arrays.items()})


def apply_whitening(x, w, dim=None, device=None):
    """y = normalize((x − mean) · projection[:dim]ᵀ) (no normalisation when not w.renormalize).

    x: [N, D_in] torch tensor (-> float32 tensor on `device` or x's device) or numpy array /
    memory map (-> float32 numpy array), processed in blocks of ROWS rows."""
    if x.shape[-1] != w.mean.shape[0]:
        raise ValueError(f"whitening ({w.kind}) expects {w.mean.shape[0]}-d features, got {x.shape[-1]}-d")
    dim = w.dim if dim is None else int(dim)
    if not 0 < dim <= w.dim:
        raise ValueError(f"whitening to {dim} dimensions: the file has {w.dim}")
    as_tensor = isinstance(x, torch.Tensor)
    device = torch.device(device) if device is not None else (x.device if as_tensor else torch.device("cpu"))
    mean = torch.from_numpy(w.mean).to(device)
    proj = torch.from_numpy(w.projection[:dim]).to(device)
    out = torch.empty(len(x), dim, device=device)
    for start in range(0, len(x), ROWS):
        block = x[start:start + ROWS]
        block = block if as_tensor else torch.from_numpy(np.array(block))
        y = (block.to(device, torch.float32) - mean) @ proj.T
        out[start:start + ROWS] = torch.nn.functional.normalize(y, dim=1) if w.renormalize else y
    return out if as_tensor else out.cpu().numpy()


# ----------------------------------------------------------------------------- command line


def _parser():
    from insclr.args import Parser, existing_file, nonnegative_float, output_file, positive_int

    p = Parser(prog="python -m insclr.whiten",
               description="Fit a whitening (PCA, or learned from the candidate pool's mutual neighbours).")
    p.add_argument("--features", required=True, type=existing_file, help="features.npy to fit on")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--pca", type=positive_int, metavar="D", help="PCA-whitening to D dimensions")
    how.add_argument("--pool", type=existing_file, help="pool.npz of these features: learned whitening")
    p.add_argument("--thresh", type=float, default=0.7, help="learned: least pair similarity (default 0.7)")
    p.add_argument("--k", type=positive_int, default=5, help="learned: mutual among the first K neighbours (5)")
    p.add_argument("--shrink", type=nonnegative_float, default=0.1,
                   help="learned: shrinkage of the intra-pair covariance, in [0, 1] (default 0.1)")
    p.add_argument("--dim", type=positive_int, default=None, help="learned: output dimensions (default D)")
    p.add_argument("--out", required=True, type=output_file, help="output W.npz")
    return p


def run(args):
    from insclr.pool import features_source, load_features, read_pool

    features = load_features(args.features)
    source = features_source(args.features)
    meta = {"source": str(args.features), "count": len(features), "shards_identity": source.get("shards_identity")}
    if args.pca:
        mean, projection = pca_whitening(features, args.pca)
        kind = "pca"
    else:
        if args.shrink > 1:
            raise ValueError(f"--shrink {args.shrink}: must be in [0, 1]")
        neighbors, similarities, identity = read_pool(args.pool)
        if len(neighbors) != len(features):
            raise ValueError(f"{args.pool}: {len(neighbors)} rows but {args.features} has {len(features)}")
        if identity and meta["shards_identity"] and identity != meta["shards_identity"]:
            raise ValueError(f"{args.pool}: made from other shards than {args.features} (identities differ)")
        pairs = mutual_pairs(neighbors, similarities, args.k, args.thresh)
        print(f"{len(pairs)} mutual {args.k}-NN pairs with similarity >= {args.thresh} "
              f"over {len(np.unique(pairs))} of {len(features)} images")
        mean, projection = learned_whitening(features, pairs, args.dim, args.shrink)
        kind = "learned"
        meta.update(pairs=len(pairs), k=args.k, thresh=args.thresh, shrink=args.shrink)
    save_whitening(args.out, mean.numpy(), projection.numpy(), kind, **meta)
    print(f"whitening ({kind}) {projection.shape[1]} -> {projection.shape[0]} dims -> {args.out}")
    return 0


def main(argv=None):
    from insclr.io import print_error

    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError, RuntimeError) as e:
        print_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
