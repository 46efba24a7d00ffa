"""Static result pages: `write_page(out_dir, title, sections)` writes out_dir/index.html.

Each section (an evaluation set, or a search) is a table with one row per query: the query's
thumbnail (its crop where the protocol crops it) linking to the full image, its AP, and its
top-k thumbnails framed green (positive), red (negative), grey (junk) or not at all (unknown),
each linking to the full image. A click on a column head sorts the table by AP (or back to
query order); `#sort=ap` / `#sort=-ap` in the address sorts on load. The page needs no network:
CSS and script are inline, images are files under out_dir/images and out_dir/thumbs.

`search_page` draws the results of `python -m insclr.search query`; `insclr.evaluate.html`
those of an evaluation.
"""

import html
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from insclr.io import atomic_path

LABELS = ("pos", "neg", "junk")

STYLE = """
body{font-family:sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;margin-bottom:32px}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:middle;text-align:left}
th button{font:inherit;font-weight:bold;cursor:pointer;background:#eef;border:1px solid #99c;border-radius:3px}
img{display:block;max-width:THUMBpx;max-height:THUMBpx}
img.figure{max-width:none;max-height:none}
.q img{border:4px solid #2858dc}
.hits{display:flex;gap:4px;flex-wrap:nowrap;align-items:flex-start}
.hit{display:block;border:4px solid transparent;position:relative;text-decoration:none}
.hit.pos{border-color:#28aa3c}.hit.neg{border-color:#d22828}.hit.junk{border-color:#969696}
.hit span{position:absolute;left:0;bottom:0;background:rgba(255,255,255,.8);font-size:11px;color:#000;padding:0 2px}
.ap{font-variant-numeric:tabular-nums;font-weight:bold}
.legend span{display:inline-block;padding:0 6px;margin-right:6px;border:3px solid}
"""

SCRIPT = """
function sortTable(table, key, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const value = r => { const v = r.dataset[key]; return v === "" ? NaN : parseFloat(v); };
  rows.sort((a, b) => {
    const x = value(a), y = value(b);
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);  // rows without a value last
    return descending ? y - x : x - y;
  });
  rows.forEach(r => body.appendChild(r));
  table.dataset.sorted = (descending ? "-" : "") + key;
}
document.querySelectorAll("table.results").forEach(table => {
  table.querySelectorAll("th button").forEach(button => button.addEventListener("click", () => {
    const key = button.dataset.key;
    sortTable(table, key, table.dataset.sorted === key);  // a second click reverses
  }));
});
const wanted = /sort=(-?)(\\w+)/.exec(location.hash);
if (wanted) document.querySelectorAll("table.results").forEach(t => sortTable(t, wanted[2], wanted[1] === "-"));
"""


class PageImages:
    """The page's image files: each image once (by key), full as given plus a thumbnail of its
    crop. Paths returned are relative to out_dir."""

    def __init__(self, out_dir, thumb=128):
        self.out_dir, self.thumb = Path(out_dir), int(thumb)
        self._done = {}
        (self.out_dir / "images").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "thumbs").mkdir(parents=True, exist_ok=True)

    def add(self, key, image, crop=None):
        """key: a unique name; image: JPEG bytes / uint8 array of them, or a PIL image; crop:
        (x, y, w, h) of the thumbnail's window. -> (thumbnail path, full image path)."""
        if key in self._done:
            return self._done[key]
        stem = f"{len(self._done):06d}"
        if isinstance(image, Image.Image):
            full, im = f"images/{stem}.png", image
            im.save(self.out_dir / full)
        else:
            data = np.asarray(image, dtype=np.uint8).tobytes() if not isinstance(image, bytes) else image
            full = f"images/{stem}.jpg"
            (self.out_dir / full).write_bytes(data)
            im = Image.open(io.BytesIO(data))
        im = im.convert("RGB")
        if crop is not None:
            x, y, w, h = (int(v) for v in crop)
            im = im.crop((x, y, x + w, y + h))
        im.thumbnail((self.thumb, self.thumb), Image.BILINEAR)
        thumb = f"thumbs/{stem}.jpg"
        im.save(self.out_dir / thumb, quality=85)
        self._done[key] = (thumb, full)
        return self._done[key]


def _num(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.6g}"


def _row(i, row):
    e = html.escape
    qthumb, qfull = row["query"]
    ap = row.get("ap")
    hits = []
    for h in row["results"]:
        label = h.get("label")
        cls = f"hit {label}" if label in LABELS else "hit"
        tip = f"{h['key']}  score {h['score']:.4f}" + (f"  {label}" if label else "")
        hits.append(f'<a class="{cls}" href="{e(h["full"])}" title="{e(tip)}" data-key="{e(str(h["key"]))}">'
                    f'<img src="{e(h["thumb"])}" alt="{e(str(h["key"]))}"><span>{h["score"]:.3f}</span></a>')
    ap_text = "–" if _num(ap) == "" else f"{float(ap):.3f}"
    return (f'<tr class="query" data-order="{i}" data-ap="{_num(ap)}">'
            f'<td>{i}</td><td class="q"><a href="{e(qfull)}"><img src="{e(qthumb)}" alt="query"></a>'
            f'<div class="name">{e(str(row["name"]))}</div></td>'
            f'<td class="ap">{ap_text}</td><td><div class="hits">{"".join(hits)}</div></td></tr>')


def _section(title, rows, k):
    aps = [r["ap"] for r in rows if _num(r.get("ap")) != ""]
    summary = f"{len(rows)} queries" + (f", mean AP {np.mean(aps):.3f} over {len(aps)}" if aps else "")
    body = "\n".join(_row(i, r) for i, r in enumerate(rows))
    return (f'<h2>{html.escape(title)}</h2><p class="summary">{summary}</p>'
            f'<table class="results" data-title="{html.escape(title)}"><thead><tr>'
            f'<th><button data-key="order">#</button></th><th>query</th>'
            f'<th><button data-key="ap">AP</button></th><th>top {k}</th></tr></thead>'
            f'<tbody>\n{body}\n</tbody></table>')


def write_page(out_dir, title, sections, thumb=128, figures=()):
    """sections: list of (title, rows); a row is {"name", "ap" (float or None), "query": (thumb,
    full), "results": [{"key", "score", "label" (pos|neg|junk|None), "thumb", "full"}]} with paths
    from PageImages; figures: image paths (relative to out_dir) shown below the tables. Writes
    out_dir/index.html (atomically) and returns its path."""
    out = Path(out_dir) / "index.html"
    k = max((len(r["results"]) for _, rows in sections for r in rows), default=0)
    legend = ('<p class="legend"><span style="border-color:#2858dc">query</span>'
              '<span style="border-color:#28aa3c">positive</span><span style="border-color:#d22828">negative</span>'
              '<span style="border-color:#969696">junk</span><span style="border-color:transparent">unframed: '
              'not known</span> Click AP to sort by it.</p>')
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE.replace('THUMB', str(thumb))}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{legend}\n"
            + "\n".join(_section(t, rows, k) for t, rows in sections)
            + "".join(f'<p><img class="figure" src="{html.escape(f)}" alt="figure"></p>' for f in figures)
            + f"\n<script>{SCRIPT}</script></body></html>\n")
    with atomic_path(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return out


def average_precision_at_k(labels, positives):
    """AP of a ranked list of labels ('pos' counts) over min(len, positives) relevant items, or
    None when no positive exists."""
    if positives <= 0:
        return None
    hits, total = 0, 0.0
    for rank, label in enumerate(labels, 1):
        if label == "pos":
            hits += 1
            total += hits / rank
    return total / min(len(labels), positives) if labels else 0.0


def search_page(index, queries, images, results, out_dir):
    """The page of a search: queries (expanded, see insclr.search.expand_queries), images {name:
    PIL image} of the file queries, results as run_query makes them. Positives are the indexed
    images of the query's label when the query is a key of a labelled folder."""
    from insclr.data.reader import ShardReader
    from insclr.shard.manifest import Manifest

    manifest = Manifest.load(index.info["shards"])
    if manifest.identity != index.info["shards_identity"]:
        raise ValueError(f"{manifest.root}: the shard folder changed since index {index.folder} was made; "
                         f"its images cannot be shown")
    split = index.info["split"]
    labels = manifest.labels(split)
    store = PageImages(out_dir)
    reader = ShardReader(manifest, split, threads=2)
    try:
        rows = []
        for (name, kind, value), res in zip(queries, results):
            query = store.add(f"row{value}" if kind == "key" else f"file:{name}",
                              reader.read([value])[0] if kind == "key" else images[name])
            qlabel = int(labels[value]) if kind == "key" else -1
            hits = []
            for h in res["results"]:
                thumb, full = store.add(f"row{h['row']}", reader.read([h["row"]])[0])
                label = None if qlabel < 0 else "pos" if labels[h["row"]] == qlabel else "neg"
                hits.append({"key": h["key"], "score": h["score"], "label": label, "thumb": thumb, "full": full})
            ap = average_precision_at_k([h["label"] for h in hits], int((labels == qlabel).sum())) \
                if qlabel >= 0 else None
            rows.append({"name": name, "ap": ap, "query": query, "results": hits})
    finally:
        reader.close()
    write_json_sidecar(out_dir, results)
    return write_page(out_dir, f"search of {index.folder.name} ({index.info['count']} images)", [("queries", rows)])


def write_json_sidecar(out_dir, obj):
    """results.json beside the page: the same figures for scripts."""
    with atomic_path(Path(out_dir) / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))
