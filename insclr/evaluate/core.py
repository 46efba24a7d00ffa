"""`evaluate(model, datasets, shards_root, scales, device, ...)`: features, scores and metrics.

Extraction runs on every rank (each its part of the images, gathered); rank 0 scores, draws
and returns the results; other ranks return {}.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from insclr import dist
from insclr.evaluate.datasets import load_eval_set, positive_sets
from insclr.evaluate.metrics import (gldv2_map_at_k, instre_map, revisitop_map_features,
                                     topk_from_features)
from insclr.io import read_json, save_npy, write_json
from insclr.model import eval_mode
from insclr.shard.manifest import Manifest


def model_fingerprint(model, scales, size, dtype="float32"):
    """sha256 (hex) of the model's weights and layout, the scales, the image size and the storage
    dtype of the features (float16 names stay those of earlier float16-only caches)."""
    m = getattr(model, "module", model)
    tag = "" if dtype == "float16" else f"|{dtype}"
    h = hashlib.sha256(f"{type(m).__name__}|{getattr(m, 'out_dim', '')}|{tuple(scales)}|{size}{tag}".encode())
    for name, value in m.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _extract(model, manifest, split, mode, size, scales, device, amp, dtype):
    from insclr.data import StreamLoader
    from insclr.features import extract

    loader = StreamLoader(manifest, split=split, mode=mode, size=size, device=device,
                          rank=dist.rank(), world_size=dist.world_size())
    return extract(model, loader, scales, device, amp, dtype=DTYPES[dtype])


def cached_features(path, fingerprint, compute):
    """Features from `path` when its sidecar JSON has `fingerprint`; else compute (all ranks),
    save on rank 0 and wait for it. Returns [N, D] as computed (memory-mapped when loaded)."""
    path, meta = Path(path), Path(path).with_suffix(".json")
    if path.exists() and meta.exists() and read_json(meta).get("fingerprint") == fingerprint:
        return np.load(path, mmap_mode="r")
    feats = compute()
    if dist.is_main():
        save_npy(path, feats)
        write_json(meta, {"fingerprint": fingerprint, "count": int(feats.shape[0])})
    dist.barrier()
    return feats


def _features(model, es, scales, device, amp, save_dir, fp, dtype):
    def get(manifest, split, mode, tag):
        compute = lambda: _extract(model, manifest, split, mode, es.size, scales, device, amp, dtype)  # noqa: E731
        if save_dir is None:
            return compute()
        # saved features belong to this model and to these shards (re-made shards: extracted again)
        return cached_features(Path(save_dir) / f"{es.name}-{tag}.npy", f"{fp}:{manifest.identity}:{split}", compute)
    return get(es.database, "part", "longest", "database"), get(es.queries, es.query_split, es.query_mode, "queries")


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return [None if (isinstance(v, float) and np.isnan(v)) else v for v in value.tolist()]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def score(es, queries, database, device):
    """Metrics of one evaluation set from its features: (summary dict, per-query AP array)."""
    if es.kind == "revisitop":
        r = revisitop_map_features(queries, database, es.gnd, device=device)
        out = {k: _jsonable(r[k]) for k in ("mapE", "mapM", "mapH", "mprE", "mprM", "mprH", "kappas",
                                             "apsE", "apsM", "apsH")}
        return out, r["apsM"]
    if es.kind == "instre":
        r = instre_map(queries, database, es.gnd, device=device)
        return {"map": r["map"], "aps": _jsonable(r["aps"])}, r["aps"]
    _, top = topk_from_features(queries, database, 100, device=device)
    return gldv2_summary(es, top.cpu().numpy())


def gldv2_summary(es, top):
    """GLDv2 mAP@100 per split from ranked database indices top int [Q, >=100]: (summary, aps)."""
    aps = gldv2_map_at_k(top, [g["positives"] for g in es.gnd], k=100)
    usage = np.array([g["usage"] for g in es.gnd])
    out = {}
    for split in ("Public", "Private"):
        keep = (usage == split) & ~np.isnan(aps)
        out[f"map100_{split.lower()}"] = float(aps[keep].mean()) if keep.any() else None
        out[f"queries_{split.lower()}"] = int(keep.sum())
    out["aps"] = _jsonable(np.where(usage == "Ignored", np.nan, aps))
    return out, aps


def evaluate(model, datasets, shards_root, scales=None, device="cpu", show=0, out_dir=None,
             distractors=None, save_features=None, amp="auto", size=None, dtype="float32", whitening=None,
             rerank=(), pca=(), html=None, html_queries=100, pr=None):
    """Evaluate `model` on `datasets` (names, see datasets.NAMES) -> {name: metrics} on rank 0.

    scales: None = each protocol's own (multi-scale; INSTRE single scale). distractors: shard
    folder of revisitop1m (+R-1M, appended to revisitop databases; features cached beside it).
    show: queries per picture written to out_dir/<name>-retrieval.png. size: None = the
    protocol's longer side (1024; INSTRE 256), else this one for every set (quick checks).
    dtype: storage of the features, float32 (the original's: scores of near-tied images keep their
    order) or float16 (half the memory, for +R-1M); the scores are float32 products of either.
    whitening (insclr.whiten.Whitening), rerank ([insclr.rerank.Step]), pca (dimensions): also
    score those variants of the features, under the set's "variants" (evaluate/variants.py).
    html: folder of a result page (index.html, the first `html_queries` queries of every set).
    pr: PNG of the mean precision–recall curve of every set (also drawn on the html page).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    with eval_mode(model):
        return _evaluate(model, datasets, shards_root, scales, torch.device(device), show, out_dir, distractors,
                         save_features, amp, size, dtype, whitening, rerank, pca, html, html_queries, pr)


def _evaluate(model, datasets, shards_root, scales, device, show, out_dir, distractors, save_features, amp, size,
              dtype, whitening, rerank, pca, html, html_queries, pr):
    sections, store, curves = [], None, {}
    if html and dist.is_main():
        from insclr.webpage import PageImages

        store = PageImages(html)
    results = {}
    for name in datasets:
        es = load_eval_set(name, shards_root)
        if size:
            es.size = int(size)
        sc = tuple(scales) if scales else es.scales
        fp = model_fingerprint(model, sc, es.size, dtype)
        database, queries = _features(model, es, sc, device, amp, save_features, fp, dtype)
        extra = None
        if distractors and es.kind == "revisitop":
            extra = Manifest.load(distractors)
            d = cached_features(Path(distractors) / f"features-{fp[:16]}.npy", f"{fp}:{extra.identity}:part",
                                lambda: _extract(model, extra, "part", "longest", es.size, sc, device, amp, dtype))
            database = np.concatenate([np.asarray(database), np.asarray(d)])
        if not dist.is_main():
            continue
        summary, aps = score(es, queries, database, device)
        summary.update(queries=es.num_queries, database=int(database.shape[0]), scales=list(sc), size=es.size)
        if whitening is not None or rerank or pca:
            from insclr.evaluate.variants import variants

            summary["variants"], skipped = variants(es, queries, database, device, whitening, rerank, pca)
            if skipped:
                summary["variants_skipped"] = skipped
        if show and out_dir:
            from insclr.evaluate.show import retrieval_picture

            _, top = topk_from_features(queries, database, 10, device=device)
            path = Path(out_dir) / f"{name}{'+r1m' if extra is not None else ''}-retrieval.png"
            retrieval_picture(es, top.cpu().numpy(), aps, positive_sets(es), path, n=show, distractors=extra)
            summary["picture"] = str(path)
        if pr or html:
            curves[name + ("+r1m" if extra is not None else "")] = pr_curve(es, queries, database, device)
        if html:
            sections.append(_html_section(es, queries, database, aps, extra, device, store, html_queries))
        results[name + ("+r1m" if extra is not None else "")] = summary
    if dist.is_main() and (pr or html):
        from insclr.plot import pr_plot

        for path in [p for p in (pr, html and Path(html) / "pr.png") if p]:
            pr_plot(curves, path)
    if html and dist.is_main():
        from insclr.webpage import write_page

        page = write_page(html, f"evaluation of {getattr(model, 'arch', 'model')}", sections, figures=["pr.png"])
        for r in results.values():
            r["page"] = str(page)
    return results


PR_DEPTH = 1000  # ranks of the precision–recall curves (positives below count as not found)


def pr_curve(es, queries, database, device, depth=PR_DEPTH):
    """(recall levels, mean interpolated precision) of set `es` over its top `depth` results,
    junk removed (revisitop: the Medium setup, as the per-query AP)."""
    from insclr.plot import mean_pr_curve

    _, top = topk_from_features(queries, database, depth, device=device)
    ranked, counts = [], []
    for q, (pos, junk) in enumerate(positive_sets(es)):
        ids = top[q].cpu().numpy()
        ids = ids[~np.isin(ids, junk)]
        ranked.append(np.isin(ids, pos))
        counts.append(len(pos))
    return mean_pr_curve(ranked, counts)


def _html_section(es, queries, database, aps, extra, device, store, n):
    """(title, rows) of one set for the result page: its first `n` queries with their top 10."""
    from insclr.evaluate.html import retrieval_rows

    scores, top = topk_from_features(queries[:n], database, 10, device=device)
    rows = retrieval_rows(es, scores.cpu().numpy(), top.cpu().numpy(), aps, positive_sets(es), store, n=n,
                          distractors=extra)
    return f"{es.name}{'+r1m' if extra is not None else ''}", rows


def table_rows(results):
    """One row per dataset with the protocol's headline figures, in percent."""
    rows = []
    for name, r in results.items():
        row = {"dataset": name}
        if "mapM" in r:
            for s in "EMH":
                row[f"mAP {s}"] = 100 * r["map" + s]
            for s in "EMH":
                row[f"mP@{'/'.join(map(str, r['kappas']))} {s}"] = "/".join(f"{100 * v:.1f}" for v in r["mpr" + s])
        elif "map" in r:
            row["mAP"] = 100 * r["map"]
        else:
            for s in ("public", "private"):
                v = r[f"map100_{s}"]
                row[f"mAP@100 {s}"] = "n/a" if v is None else 100 * v
        rows.append(row)
    return rows


def save_results(path, results, meta):
    write_json(path, {"meta": meta, "results": json.loads(json.dumps(results))})
