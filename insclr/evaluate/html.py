"""The evaluation's result page (`python -m insclr.evaluate --html DIR`): per set a table of its
queries with the query crop, the AP, and the top-k marked positive / negative / junk (the same
labels as the PNG pictures of insclr.evaluate.show), drawn by insclr.webpage."""

import numpy as np

from insclr.data.reader import ShardReader
from insclr.data.transforms import query_window


def query_crop(es, q):
    """(x, y, w, h) window of query q in its stored image, or None where the protocol uses the
    whole image."""
    if es.query_mode != "query":
        return None
    split = es.query_split
    return query_window(es.gnd[q]["bbx"], es.queries.sizes(split)[q], es.queries.orig_sizes(split)[q])


def retrieval_rows(es, scores, top_indices, aps, positives, store, n=100, distractors=None):
    """Rows (insclr.webpage.write_page) of the first `n` queries of evaluation set `es`.

    scores / top_indices: float / int [Q, k] ranked database results (indices ≥ the database
    size are distractors, read from the `distractors` Manifest); aps: per-query AP (NaN: none);
    positives: per query (pos, junk) index arrays; store: a webpage.PageImages."""
    n_db = es.database.num_samples("part")
    ids = es.database.ids("part")
    extra_ids = distractors.ids("part") if distractors is not None else []
    queries = ShardReader(es.queries, es.query_split, threads=2)
    database = ShardReader(es.database, "part", threads=2)
    extra = ShardReader(distractors, "part", threads=2) if distractors is not None else None
    rows = []
    try:
        for q in range(min(n, es.num_queries)):
            pos, junk = set(positives[q][0].tolist()), set(positives[q][1].tolist())
            query = store.add(f"{es.name}/query/{q}", queries.read([q])[0], crop=query_crop(es, q))
            hits = []
            for s, i in zip(np.asarray(scores[q]), np.asarray(top_indices[q])):
                i = int(i)
                if i < n_db:
                    thumb, full = store.add(f"{es.name}/db/{i}", database.read([i])[0])
                    key = ids[i]
                else:
                    thumb, full = store.add(f"distractor/{i - n_db}", extra.read([i - n_db])[0])
                    key = extra_ids[i - n_db]
                label = "pos" if i in pos else "junk" if i in junk else "neg"
                hits.append({"key": key, "score": float(s), "label": label, "thumb": thumb, "full": full})
            ap = None if np.isnan(aps[q]) else float(aps[q])
            rows.append({"name": f"query {q}: {es.queries.ids(es.query_split)[q]}", "ap": ap,
                         "query": query, "results": hits})
    finally:
        for r in (queries, database, extra):
            if r is not None:
                r.close()
    return rows
