"""Synthetic candidate pools of any size, without features or images (tests and benchmarks).

Row i's neighbours are i + o_1, ..., i + o_k (mod N) for k distinct offsets o_j in [1, N)
drawn per block of rows, so no row lists itself or a neighbour twice; similarities fall from
0.95 to 0.05 along the row with a small per-row shift, so the §8 boundaries (0.75, 0.5) cut
every row. `write_pool` streams pool.npz in blocks (the layout python -m insclr.pool writes:
stored .npy members), so a 1.2M x 500 pool (3.6 GB) is written in bounded memory.
"""

import zipfile

import numpy as np

BLOCK = 1 << 16


def pool_rows(start, stop, n, k, seed=0, dtype=np.float16):
    """(neighbors int32 [stop-start, k], similarities `dtype` [stop-start, k]) of rows start..stop-1."""
    if not 0 < k < n:
        raise ValueError(f"synthetic pool: k={k} must be in [1, N-1={n - 1}]")
    rng = np.random.default_rng([seed, start])
    offsets = (rng.choice(n - 1, size=k, replace=False) + 1).astype(np.int32)
    neighbors = np.arange(start, stop, dtype=np.int32)[:, None] + offsets[None, :]
    neighbors[neighbors >= n] -= n                                      # (i + o) mod N, N < 2^30
    shift = rng.uniform(-0.03, 0.03, size=(stop - start, 1)).astype(np.float32)
    similarities = (np.linspace(0.95, 0.05, k, dtype=np.float32)[None, :] + shift).astype(dtype)
    return neighbors, similarities


def random_pool(n, k, seed=0, identity=None, dtype=np.float16):
    """An in-memory CandidatePool of N rows and k neighbours (see the module docstring)."""
    from insclr.candidates import CandidatePool

    parts = [pool_rows(a, min(n, a + BLOCK), n, k, seed, dtype) for a in range(0, n, BLOCK)]
    return CandidatePool(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), identity)


def write_pool(path, n, k, seed=0, identity=None, show=False, dtype=np.float16):
    """Write the synthetic pool of N x k to pool.npz at `path` in blocks; returns the path.

    `identity`: the shards_identity string to record (None: no record); `dtype`: of the similarities."""
    from insclr.io import atomic_path, progress

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for column, member_dtype in ((0, np.int32), (1, dtype)):
                name = ("neighbors", "similarities")[column]
                with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(member_dtype)), "fortran_order": False,
                              "shape": (n, k)}
                    np.lib.format.write_array_header_1_0(f, header)
                    with progress(total=n, desc=f"synthetic pool {name}", disable=None if show else True) as bar:
                        for a in range(0, n, BLOCK):
                            b = min(n, a + BLOCK)
                            f.write(pool_rows(a, b, n, k, seed, dtype)[column].tobytes())
                            bar.update(b - a)
            if identity is not None:
                with z.open("shards_identity.npy", "w") as f:
                    np.lib.format.write_array(f, np.array(identity))
    return path
