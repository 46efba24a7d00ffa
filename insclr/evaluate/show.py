"""Retrieval pictures: per query a row with the query crop, then its top results with green
(positive), red (negative) and grey (junk) borders, and the query's AP written on the row.

`draw_rows` is the pure drawing part (training can call it with any images);
`retrieval_picture` reads the images of an evaluation set out of its shards.
"""

import io

import numpy as np
from PIL import Image, ImageDraw

from insclr.data.reader import ShardReader
from insclr.data.transforms import query_window
from insclr.io import atomic_path

COLORS = {"pos": (40, 170, 60), "neg": (210, 40, 40), "junk": (150, 150, 150), "query": (40, 90, 220)}
BORDER = 6
LABEL_H = 18


def _tile(image, color, thumb):
    """A thumb×thumb tile: the image fitted inside, framed by a `color` border."""
    tile = Image.new("RGB", (thumb, thumb), color)
    inner = thumb - 2 * BORDER
    im = image.convert("RGB")
    im.thumbnail((inner, inner), Image.BILINEAR)
    tile.paste(im, (BORDER + (inner - im.width) // 2, BORDER + (inner - im.height) // 2))
    return tile


def draw_rows(rows, path, thumb=128):
    """Write the PNG grid to `path` (atomically).

    rows: list of dicts with 'query' (PIL image), 'results' (list of PIL images), 'labels'
    (list of 'pos' | 'neg' | 'junk', one per result) and 'text' (written above the row, e.g.
    "q 3  AP 0.512"). Returns the PIL image.
    """
    width = max(1 + len(r["results"]) for r in rows) * (thumb + 4) + 4
    height = len(rows) * (thumb + LABEL_H + 4) + 4
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        y = 4 + i * (thumb + LABEL_H + 4)
        draw.text((4, y + 2), r.get("text", ""), fill=(0, 0, 0))
        tiles = [_tile(r["query"], COLORS["query"], thumb)]
        tiles += [_tile(im, COLORS[lab], thumb) for im, lab in zip(r["results"], r["labels"])]
        for j, t in enumerate(tiles):
            canvas.paste(t, (4 + j * (thumb + 4), y + LABEL_H))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return canvas


def _decode(data):
    return Image.open(io.BytesIO(np.asarray(data, dtype=np.uint8).tobytes()))


def query_image(es, q, jpeg):
    """The query as the protocol sees it: cropped to its box for revisitop/INSTRE."""
    im = _decode(jpeg)
    if es.query_mode != "query":
        return im
    split = es.query_split
    x, y, w, h = query_window(es.gnd[q]["bbx"], es.queries.sizes(split)[q], es.queries.orig_sizes(split)[q])
    return im.crop((x, y, x + w, y + h))


def retrieval_picture(es, top_indices, aps, positives, path, n=8, distractors=None, thumb=128, top=10):
    """Draw the first `n` queries of evaluation set `es` with their top-`top` results.

    top_indices: int [Q, >=top] ranked database indices (indices ≥ database size are distractors,
    read from the `distractors` Manifest). aps: per-query AP; positives: per query (pos, junk).
    """
    n_db = es.database.num_samples("part")
    queries = ShardReader(es.queries, es.query_split, threads=2)
    database = ShardReader(es.database, "part", threads=2)
    extra = ShardReader(distractors, "part", threads=2) if distractors is not None else None
    rows = []
    try:
        for q in range(min(n, es.num_queries)):
            pos, junk = set(positives[q][0].tolist()), set(positives[q][1].tolist())
            ids = [int(i) for i in np.asarray(top_indices[q])[:top]]
            results = [_decode(database.read([i])[0]) if i < n_db else _decode(extra.read([i - n_db])[0])
                       for i in ids]
            labels = ["pos" if i in pos else "junk" if i in junk else "neg" for i in ids]
            ap = aps[q]
            text = f"{es.name} query {q}   AP {'n/a (no positives)' if np.isnan(ap) else f'{ap:.3f}'}"
            rows.append({"query": query_image(es, q, queries.read([q])[0]), "results": results,
                         "labels": labels, "text": text})
    finally:
        for r in (queries, database, extra):
            if r is not None:
                r.close()
    return draw_rows(rows, path, thumb)
