"""Re-ranking from the same descriptor: αQE, DBA and diffusion (docs/rerank.md).

Pure functions on L2-normalised float features (torch tensors or numpy arrays / memory maps, any
float dtype), computed on `device` in chunks so that a +R-1M database (1M × 2048) never needs a
Q × N or N × N matrix at once beyond one chunk:

- `aqe(queries [Q,D], database [N,D], k, alpha) -> [Q,D]` (α-weighted query expansion),
- `dba(database [N,D], k, alpha) -> [N,D]` (database-side augmentation),
- `diffusion(queries, database, ...) -> scores [Q,N]` (Iscen et al., CVPR 2017, truncated),
- `knn_graph(database, k) -> (neighbors [N,k], similarities [N,k])`, the graph diffusion walks on.

Outputs are float32 on `device`. Ranking ties go to the lower database index everywhere
(`insclr.evaluate.metrics.topk_from_features`). `parse_step` / `apply_steps` turn
`--rerank NAME:key=value,...` options into calls (`python -m insclr.evaluate --rerank ...`).
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from insclr.evaluate.metrics import topk_from_features
from insclr.pool import exclude_self_topk

ROW_CHUNK = 4096          # database rows per chunk of DBA / the kNN graph
CPU_GATHER = 1 << 22      # float32 elements of neighbour rows gathered at a time by DBA on the CPU
QUERY_CHUNK = 16          # queries per chunk of diffusion (their sub-graphs are solved together)

# Iscen et al. 2017 (and their public code): k = 50 graph neighbours, k_q = 10 query neighbours,
# γ = 3, α = 0.99, conjugate gradient with at most 20 iterations and tolerance 1e-6. Truncation
# (their large-scale variant): each query diffuses on the sub-graph of its top 1000 images.
DIFFUSION_DEFAULTS = {"k": 50, "query_k": 10, "gamma": 3.0, "alpha": 0.99, "truncate": 1000,
                      "iterations": 20, "tol": 1e-6}


def _device(x, device):
    if device is not None:
        return torch.device(device)
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _rows(features, index, device):
    """features[index] as float32 on `device`; index: int64 tensor of any shape."""
    flat = index.reshape(-1)
    if isinstance(features, torch.Tensor):
        rows = features.index_select(0, flat.to(features.device))
    else:
        rows = torch.from_numpy(np.asarray(features[flat.cpu().numpy()]))
    return rows.to(device, torch.float32).view(*index.shape, -1)


def _block(features, start, stop, device):
    block = features[start:stop]
    if not isinstance(block, torch.Tensor):
        block = torch.from_numpy(np.array(block))
    return block.to(device, torch.float32)


def _expand(base, neighbors, weights, features, device):
    """normalize(base + Σ_i weights_i · features[neighbors_i]); base [B,D], neighbors/weights [B,k]."""
    out = base + torch.bmm(weights[:, None, :], _rows(features, neighbors, device))[:, 0]
    return torch.nn.functional.normalize(out, dim=1)


def _weights(similarities, alpha):
    # max(s, 0)^α; α = 0 gives weight 1 to every neighbour (average query expansion)
    return similarities.float().clamp(min=0).pow(alpha)


def aqe(queries, database, k=2, alpha=3.0, device=None, chunk=None):
    """α-weighted query expansion -> float32 [Q, D]: q ← normalize(q + Σ_{i≤k} max(s_i,0)^α d_i)
    over the query's top-k database vectors d_i (similarity s_i)."""
    device = _device(queries, device)
    q = _block(queries, 0, len(queries), device)
    if k == 0:
        return q
    sims, idx = topk_from_features(q, database, k, chunk=chunk, device=device)
    return _expand(q, idx, _weights(sims, alpha), database, device)


def _self_excluded_topk(database, start, stop, k, device, chunk):
    """Top-k other database rows of rows start..stop: (similarities [B,k], indices int64 [B,k])."""
    rows = _block(database, start, stop, device)
    sims, idx = topk_from_features(rows, database, k + 1, chunk=chunk, device=device)
    own = torch.arange(start, stop, device=device)
    idx, sims = exclude_self_topk(sims, idx, own, min(k, idx.shape[1] - 1))
    return rows, sims, idx


def knn_graph(database, k=50, device=None, chunk=None, rows=ROW_CHUNK, show=False):
    """Exact kNN graph of the database, each row's own index excluded (duplicates of it stay):
    (neighbors int64 [N, k], similarities float32 [N, k]) on `device`, descending."""
    from insclr.io import progress

    device = _device(database, device)
    n = len(database)
    k = min(k, n - 1)
    neighbors = torch.empty(n, k, dtype=torch.int64, device=device)
    similarities = torch.empty(n, k, dtype=torch.float32, device=device)
    with progress(total=n, desc="kNN graph", unit="row", disable=None if show else True) as bar:
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            _, sims, idx = _self_excluded_topk(database, start, stop, k, device, chunk)
            neighbors[start:stop], similarities[start:stop] = idx, sims
            bar.update(stop - start)
    return neighbors, similarities


def dba(database, k=10, alpha=3.0, device=None, chunk=None, graph=None, rows=ROW_CHUNK):
    """Database-side augmentation -> float32 [N, D]: d ← normalize(d + Σ_{i≤k} max(s_i,0)^α d_i)
    over its top-k *other* database vectors, all computed from the original vectors.

    graph: optional (neighbors [N, ≥k], similarities [N, ≥k]) of `database` (self excluded,
    descending, e.g. a candidate pool) to skip the N × N search."""
    device = _device(database, device)
    n = len(database)
    out = torch.empty(n, database.shape[1], dtype=torch.float32, device=device)
    if device.type == "cpu":   # the gathered [rows, k, D] block stays cache-sized (~16 MB)
        rows = max(1, min(rows, CPU_GATHER // max(1, k * database.shape[1])))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        if k == 0 or n == 1:
            out[start:stop] = _block(database, start, stop, device)
            continue
        if graph is None:
            base, sims, idx = _self_excluded_topk(database, start, stop, k, device, chunk)
        else:
            base = _block(database, start, stop, device)
            idx = torch.as_tensor(np.asarray(graph[0][start:stop, :k]), device=device).long()
            sims = torch.as_tensor(np.asarray(graph[1][start:stop, :k]), device=device).float()
        out[start:stop] = _expand(base, idx, _weights(sims, alpha), database, device)
    return out


def _subgraph_edges(top, neighbors, similarities, gamma, position):
    """Edges of the affinity among the R images `top` [R] as (a, b, weight), a and b positions in
    `top`: A_ab = s_ab^γ when a and b are mutual kNN (the smaller of the two directed weights, so A
    is symmetric), else no edge. position: int64 [N] of -1, restored to -1 on return."""
    r = top.numel()
    position[top] = torch.arange(r, device=top.device)
    pos = position[neighbors[top]]                        # [R, k]: neighbour's place in `top`, or -1
    position[top] = -1
    a, j = torch.nonzero(pos >= 0, as_tuple=True)
    b = pos[a, j]
    w = similarities[top][a, j].clamp(min=0).pow(gamma)
    key = a * r + b
    order = torch.argsort(key)
    key, a, b, w = key[order], a[order], b[order], w[order]
    back = torch.searchsorted(key, b * r + a).clamp(max=max(key.numel() - 1, 0))
    mutual = key[back] == b * r + a if key.numel() else torch.zeros(0, dtype=torch.bool, device=top.device)
    return a[mutual], b[mutual], torch.minimum(w[mutual], w[back[mutual]])


def conjugate_gradient(matvec, b, iterations=20, tol=1e-6):
    """Solve M x = b for a batch of symmetric positive-definite systems: b [B, R], matvec(p [B, R])
    -> M p. Each row stops when its residual ‖r‖ ≤ tol·‖b‖ (or after `iterations`)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    limit = (tol * b.norm(dim=1)) ** 2
    for _ in range(iterations):
        active = rs > limit
        if not active.any():
            break
        mp = matvec(p)
        step = torch.where(active, rs / (p * mp).sum(1).clamp(min=1e-30), torch.zeros_like(rs))
        x += step[:, None] * p
        r -= step[:, None] * mp
        rs_new = (r * r).sum(1)
        p = r + torch.where(active, rs_new / rs.clamp(min=1e-30), torch.zeros_like(rs))[:, None] * p
        rs = rs_new
    return x


def diffusion(queries, database, k=50, query_k=10, gamma=3.0, alpha=0.99, truncate=1000, iterations=20,
              tol=1e-6, device=None, chunk=None, graph=None):
    """Diffusion scores float32 [Q, N] (Iscen et al., CVPR 2017), truncated.

    Each query keeps its top-`truncate` database images R (by similarity); on their sub-graph of
    the database kNN graph (k neighbours, mutual, weights s^γ, symmetrically normalised S =
    D^-1/2 A D^-1/2) it solves (I − αS) f = y by conjugate gradient, y = s^γ on the query's
    top-`query_k` images. Images of R reached by the diffusion (f > 0) score 3 + f, above every
    other image, which keeps its similarity (in [-1, 1]). graph: optional `knn_graph` output.
    """
    device = _device(queries, device)
    q = _block(queries, 0, len(queries), device)
    n = len(database)
    neighbors, similarities = graph if graph is not None else knn_graph(database, k, device, chunk)
    neighbors = torch.as_tensor(np.asarray(neighbors) if not isinstance(neighbors, torch.Tensor) else neighbors,
                                device=device).long()[:, :k]
    similarities = torch.as_tensor(np.asarray(similarities) if not isinstance(similarities, torch.Tensor)
                                   else similarities, device=device).float()[:, :k]
    r = min(truncate, n)
    scores = torch.empty(len(q), n, device=device)
    position = torch.full((n,), -1, dtype=torch.int64, device=device)
    for start in range(0, len(q), QUERY_CHUNK):
        qc = q[start:start + QUERY_CHUNK]
        for c0 in range(0, n, 1 << 16):
            scores[start:start + len(qc), c0:c0 + (1 << 16)] = qc @ _block(database, c0, c0 + (1 << 16), device).T
        sims, top = topk_from_features(qc, database, r, chunk=chunk, device=device)
        # the batch's sub-graphs as one sparse matrix over B·R nodes: query b's node a is b·R + a
        edges = [_subgraph_edges(t, neighbors, similarities, gamma, position) for t in top]
        src = torch.cat([a + b * r for b, (a, _, _) in enumerate(edges)])
        dst = torch.cat([c + b * r for b, (_, c, _) in enumerate(edges)])
        w = torch.cat([e[2] for e in edges])
        degree = torch.zeros(top.numel(), device=device).index_add_(0, src, w)
        inv = torch.where(degree > 0, degree.clamp(min=1e-30).rsqrt(), torch.zeros_like(degree))
        w = w * inv[src] * inv[dst]                       # S = D^-1/2 A D^-1/2

        def system(p):                                    # (I − αS) p
            sp = torch.zeros(p.numel(), device=device).index_add_(0, src, w * p.reshape(-1)[dst])
            return p - alpha * sp.view_as(p)

        y = torch.zeros_like(sims)
        y[:, :query_k] = sims[:, :query_k].clamp(min=0).pow(gamma)
        f = conjugate_gradient(system, y, iterations, tol)
        rows = scores[start:start + len(qc)]
        rows.scatter_(1, top, torch.where(f > 0, 3 + f, rows.gather(1, top)))
    return scores


# ----------------------------------------------------------------------------- --rerank steps

STEPS = {"aqe": {"k": 2, "alpha": 3.0}, "dba": {"k": 10, "alpha": 3.0}, "diffusion": DIFFUSION_DEFAULTS}
INTEGER_KEYS = {"k", "query_k", "truncate", "iterations"}


@dataclass
class Step:
    name: str
    params: dict = field(default_factory=dict)

    @property
    def label(self):
        changed = [f"{k}={v:g}" for k, v in self.params.items() if STEPS[self.name][k] != v]
        return self.name + (":" + ",".join(changed) if changed else "")


def parse_step(text):
    """'dba:k=10,alpha=3' -> Step('dba', {'k': 10, 'alpha': 3.0}); missing keys take the defaults."""
    name, _, rest = text.partition(":")
    if name not in STEPS:
        raise ValueError(f"--rerank {text!r}: unknown method {name!r}, expected one of {', '.join(STEPS)}")
    params = dict(STEPS[name])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in params or not eq:
            raise ValueError(f"--rerank {text!r}: {item!r} is not key=value with key among {', '.join(params)}")
        try:
            params[key] = int(value) if key in INTEGER_KEYS else float(value)
        except ValueError:
            raise ValueError(f"--rerank {text!r}: {key}={value!r} is not a number") from None
        if params[key] < 0 or (key == "alpha" and name == "diffusion" and not params[key] < 1):
            raise ValueError(f"--rerank {text!r}: {key}={value} out of range")
    return Step(name, params)


def parse_steps(texts):
    """A list of --rerank texts -> [Step]; diffusion (it gives scores, not features) must be last."""
    steps = [parse_step(t) for t in texts or ()]
    if any(s.name == "diffusion" for s in steps[:-1]):
        raise ValueError("--rerank diffusion must be the last step: it gives scores, not features")
    return steps


def apply_steps(queries, database, steps, device=None):
    """Yield (label, queries, database, scores) after each step, in order; scores is None except
    after diffusion (then the features are those it ran on)."""
    label = ""
    for step in steps:
        label += ("+" if label else "") + step.label
        if step.name == "aqe":
            queries = aqe(queries, database, device=device, **step.params)
        elif step.name == "dba":
            database = dba(database, device=device, **step.params)
        else:
            yield label, queries, database, diffusion(queries, database, device=device, **step.params)
            return
        yield label, queries, database, None
