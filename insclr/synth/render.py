"""Procedural instances and their photographs.

An *instance* is a textured planar object (a building facade: storeys, window grids, stripes, blobs,
glyph-like strokes). Instances belong to *families* that share a palette and motifs, so colour
statistics alone do not identify an instance; what tells two instances apart is their layout.
A *view* photographs one or two instances under a random viewpoint (perspective), scale, crop,
occlusion, illumination and background clutter (random shapes and pieces of other instances), and
encodes it as a JPEG.

Every texture and every view is drawn from its own generator, seeded by (seed, key), so an image
depends only on its own spec: the order of generation and the number of processes do not matter.
"""

import io
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NUM_FAMILIES = 8
TEXTURE_SIDE = 320  # longer side of an instance texture, in pixels

# Object size (fraction of the canvas' shorter side), perspective jitter (fraction of the object
# size), rotation (degrees), centre shift (fraction of the canvas), occluders (count range, max
# fraction of the object they may cover).
DIFFICULTIES = {
    "query": dict(scale=(0.45, 0.7), persp=0.06, rot=6, shift=0.12, occluders=(0, 1), cover=0.12),
    "easy": dict(scale=(0.5, 0.85), persp=0.08, rot=8, shift=0.12, occluders=(0, 1), cover=0.15),
    "hard": dict(scale=(0.3, 0.55), persp=0.22, rot=22, shift=0.3, occluders=(1, 3), cover=0.4),
    "junk": dict(scale=(0.12, 0.22), persp=0.3, rot=35, shift=0.4, occluders=(2, 4), cover=0.6),
    "crop": dict(scale=(1.0, 1.5), persp=0.1, rot=10, shift=0.35, occluders=(0, 2), cover=0.3),
    # A tourist's photograph of the landmark: it fills most of the frame (most GLDv2 photos do).
    # Optional keys: clutter (pieces of other instances in the background, default 3 at most),
    # light (strength of the illumination change, default 1).
    "landmark": dict(scale=(0.7, 0.95), persp=0.08, rot=6, shift=0.06, occluders=(0, 1), cover=0.12,
                     clutter=1, light=0.5),
}


def rng_for(seed, *key):
    """An independent numpy Generator for (seed, key...); the same key always gives the same stream."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng(np.random.SeedSequence(words))


def _hsv_to_rgb(h, s, v):
    """Colours [K] hue/saturation/value in [0, 1] -> uint8 [K, 3]."""
    h, s, v = (np.asarray(x, dtype=np.float64) for x in (h, s, v))
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    rgb = table[i, np.arange(len(i))]
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=None)
def family_style(seed, family):
    """Palette and motif preferences shared by every instance of `family` (a dict)."""
    rng = rng_for(seed, "family", family)
    hue = rng.random()
    # Two hue clusters (main and accent) so the palette is coherent but not monochrome.
    hues = np.concatenate([hue + rng.normal(0, 0.04, 4), hue + 0.5 + rng.normal(0, 0.04, 2)])
    sats = rng.uniform(0.15, 0.75, 6)
    vals = np.array([0.85, 0.35, 0.6, 0.2, 0.95, 0.5]) * rng.uniform(0.8, 1.05, 6)
    return {
        "palette": _hsv_to_rgb(hues, sats, np.clip(vals, 0.08, 1.0)),
        "window": str(rng.choice(["rect", "arch", "round"])),
        "p_windows": float(rng.uniform(0.5, 0.95)),
        "stripes": str(rng.choice(["none", "vertical", "horizontal", "diagonal"])),
        "aspect": (float(rng.uniform(0.55, 0.9)), float(rng.uniform(1.0, 1.7))),
        "roof": str(rng.choice(["flat", "gable", "dome"])),
        "grain": float(rng.uniform(3, 12)),
    }


def _colour(c):
    return tuple(int(v) for v in c)


def _draw_windows(draw, rng, box, shape, fill, frame):
    """A grid of windows inside box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cols, rows = int(rng.integers(2, 9)), int(rng.integers(1, 3))
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    fw, fh = rng.uniform(0.35, 0.7), rng.uniform(0.45, 0.8)
    lit = rng.random((rows, cols)) < 0.15
    for r in range(rows):
        for c in range(cols):
            wx0, wy0 = x0 + (c + (1 - fw) / 2) * cw, y0 + (r + (1 - fh) / 2) * ch
            wx1, wy1 = wx0 + fw * cw, wy0 + fh * ch
            colour = frame if lit[r, c] else fill
            if shape == "round":
                draw.ellipse((wx0, wy0, wx1, wy1), fill=colour, outline=frame)
            else:
                draw.rectangle((wx0, wy0, wx1, wy1), fill=colour, outline=frame)
                if shape == "arch":
                    draw.pieslice((wx0, wy0 - fw * cw / 2, wx1, wy0 + fw * cw / 2), 180, 360, fill=colour)


def _draw_strokes(draw, rng, w, h, colours):
    """Glyph-like strokes: short random polylines, the most instance-specific detail."""
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.15) * min(w, h)
        pts = [(float(cx + rng.uniform(-r, r)), float(cy + rng.uniform(-r, r))) for _ in range(int(rng.integers(3, 7)))]
        draw.line(pts, fill=colours[int(rng.integers(len(colours)))], width=int(rng.integers(2, 6)), joint="curve")


@lru_cache(maxsize=512)
def instance_texture(seed, key):
    """The frontal texture of instance `key` (str): an RGB PIL image, longer side TEXTURE_SIDE."""
    rng = rng_for(seed, "instance", key)
    style = family_style(seed, int(rng.integers(NUM_FAMILIES)))
    c = [_colour(style["palette"][i]) for i in rng.permutation(6)]
    aspect = rng.uniform(*style["aspect"])  # width / height
    w, h = (TEXTURE_SIDE, int(TEXTURE_SIDE / aspect)) if aspect >= 1 else (int(TEXTURE_SIDE * aspect), TEXTURE_SIDE)
    img = Image.new("RGB", (w, h), c[0])
    draw = ImageDraw.Draw(img)
    top = 0.0
    if style["roof"] != "flat":
        top = rng.uniform(0.12, 0.25) * h
        if style["roof"] == "gable":
            draw.polygon([(0, top), (w * rng.uniform(0.3, 0.7), 0), (w, top)], fill=c[1])
        else:
            draw.pieslice((w * 0.2, 0, w * 0.8, 2 * top), 180, 360, fill=c[1])
    edges = np.sort(np.concatenate([[top, h], rng.uniform(top, h, int(rng.integers(1, 5)))]))
    base = [c[0], c[1], c[5]]
    for k, (y0, y1) in enumerate(zip(edges[:-1], edges[1:])):
        draw.rectangle((0, y0, w, y1), fill=base[int(rng.integers(3))] if k else c[0])
        if y1 - y0 > 12 and rng.random() < style["p_windows"]:
            margin = rng.uniform(0.02, 0.15) * w
            _draw_windows(draw, rng, (margin, y0, w - margin, y1), style["window"], c[3], c[4])
        draw.line([(0, y1), (w, y1)], fill=c[2], width=int(rng.integers(1, 5)))
    if style["stripes"] != "none":
        for _ in range(int(rng.integers(2, 7))):
            p, width = rng.uniform(0, 1), int(rng.integers(2, 9))
            y = top + p * (h - top)
            line = {"vertical": [(p * w, top), (p * w, h)], "horizontal": [(0, y), (w, y)],
                    "diagonal": [(p * w, top), (p * w + 0.5 * w, h)]}[style["stripes"]]
            draw.line(line, fill=c[4], width=width)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(top, h), rng.uniform(0.04, 0.15) * w
        draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r), fill=c[int(rng.integers(6))])
    _draw_strokes(draw, rng, w, h, [c[3], c[4], c[2]])
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, style["grain"], (h, w, 1)).astype(np.float32)  # stone/plaster grain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def perspective_coeffs(dst, src):
    """The 8 coefficients PIL's PERSPECTIVE transform needs to map output points `dst` [4, 2] to input
    points `src` [4, 2] (u = (a x + b y + c) / (g x + h y + 1), v likewise with d, e, f)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))


def _object_quad(rng, tex_size, canvas, diff, centre=None, size_scale=1.0):
    """Corners [4, 2] (tl, tr, br, bl) of the object's image on the canvas."""
    W, H = canvas
    tw, th = tex_size
    s = rng.uniform(*diff["scale"]) * size_scale
    oh = s * min(W, H) * np.sqrt(th / tw)  # keep the object's area ~ s^2 of the shorter side squared
    ow = oh * tw / th
    if centre is None:
        centre = (W / 2 + rng.uniform(-1, 1) * diff["shift"] * W, H / 2 + rng.uniform(-1, 1) * diff["shift"] * H)
    quad = np.array([[-ow, -oh], [ow, -oh], [ow, oh], [-ow, oh]]) / 2
    # Keystone: one side nearer the camera than the other, then independent corner jitter.
    k = rng.uniform(-1, 1) * diff["persp"]
    quad[:, 1] *= 1 + k * np.sign(quad[:, 0])
    quad += rng.uniform(-1, 1, (4, 2)) * diff["persp"] * np.array([ow, oh])
    a = np.deg2rad(rng.uniform(-1, 1) * diff["rot"])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return quad @ rot.T + np.array(centre)


def _paste_quad(canvas, tex, quad):
    """Warp `tex` onto `canvas` (in place) so its corners land on `quad`."""
    tw, th = tex.size
    # Warp only the quad's bounding box (clipped to the canvas): most pastes are small.
    x0, y0 = np.maximum(np.floor(quad.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(quad.max(0)).astype(int), canvas.size)
    if x1 <= x0 or y1 <= y0:
        return
    coeffs = tuple(perspective_coeffs(quad - [x0, y0], [(0, 0), (tw, 0), (tw, th), (0, th)]))
    size = (int(x1 - x0), int(y1 - y0))
    warped = tex.transform(size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    mask = Image.new("L", tex.size, 255).transform(size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    canvas.paste(warped, (int(x0), int(y0)), mask)


def _random_colour(rng):
    return _colour(_hsv_to_rgb(rng.random(1), rng.uniform(0, 0.8, 1), rng.uniform(0.1, 1, 1))[0])


def _background(rng, seed, size, others, clutter=3):
    """Gradient sky/ground, random shapes, and pieces of other instances."""
    W, H = size
    corners = _hsv_to_rgb(rng.random(4), rng.uniform(0, 0.5, 4), rng.uniform(0.3, 1, 4)).reshape(2, 2, 3)
    img = Image.fromarray(corners).resize((W, H), Image.BILINEAR)  # a smooth four-corner gradient
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 14))):
        x, y = rng.uniform(0, W), rng.uniform(0, H)
        rx, ry = rng.uniform(0.02, 0.25) * W, rng.uniform(0.02, 0.25) * H
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle((x - rx, y - ry, x + rx, y + ry), fill=_random_colour(rng))
        elif shape == 1:
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=_random_colour(rng))
        else:
            draw.line([(x - rx, y - ry), (x + rx, y + ry)], fill=_random_colour(rng), width=int(rng.integers(2, 12)))
    for key in _pick(rng, others, min(int(rng.integers(1, 4)), clutter)):
        _paste_piece(img, rng, instance_texture(seed, key), "easy")
    return img


def _pick(rng, keys, n):
    if not keys:
        return []
    return [keys[i] for i in rng.choice(len(keys), size=min(n, len(keys)), replace=False)]


def _paste_piece(canvas, rng, tex, difficulty):
    """A random crop of another instance, warped somewhere on the canvas (clutter)."""
    tw, th = tex.size
    fx, fy = rng.uniform(0.3, 0.8, 2)
    x0, y0 = rng.uniform(0, 1 - fx) * tw, rng.uniform(0, 1 - fy) * th
    piece = tex.crop((int(x0), int(y0), int(x0 + fx * tw), int(y0 + fy * th)))
    diff = dict(DIFFICULTIES[difficulty], scale=(0.15, 0.45), shift=0.5)
    _paste_quad(canvas, piece, _object_quad(rng, piece.size, canvas.size, diff))


def _occlude(canvas, rng, seed, boxes, diff, others):
    """Occluders (poles, trees, people, pieces of other instances) over the objects' boxes."""
    draw = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in boxes:
        bw, bh = x1 - x0, y1 - y0
        for _ in range(int(rng.integers(diff["occluders"][0], diff["occluders"][1] + 1))):
            frac = rng.uniform(0.3, 1.0) * diff["cover"]
            cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            kind = rng.integers(4)
            if kind == 0:  # pole: thin and tall
                hw = frac * bw * 0.25
                draw.rectangle((cx - hw, y0 - bh, cx + hw, y1 + bh), fill=_random_colour(rng))
            elif kind == 1:  # tree crown or person: a blob
                r = np.sqrt(frac) * 0.5
                draw.ellipse((cx - r * bw, cy - r * bh, cx + r * bw, cy + r * bh),
                             fill=_colour(_hsv_to_rgb(rng.uniform(0.2, 0.4, 1), [0.6], [0.35])[0]))
            elif kind == 2 and others:
                _paste_piece(canvas, rng, instance_texture(seed, _pick(rng, others, 1)[0]), "easy")
            else:  # a wall or car in front: a band from the bottom
                draw.rectangle((x0 - 0.2 * bw, y1 - frac * bh, x1 + 0.2 * bw, y1 + bh), fill=_random_colour(rng))


def _illumination(img, rng, strength=1.0):
    """Brightness, contrast, colour cast and a linear light gradient, scaled by `strength`; returns a new image."""
    arr = np.asarray(img, dtype=np.float32)
    H, W = arr.shape[:2]
    a = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(a) * np.linspace(-0.5, 0.5, W, dtype=np.float32)[None, :]
            + np.sin(a) * np.linspace(-0.5, 0.5, H, dtype=np.float32)[:, None])
    light = (rng.uniform(0.65, 1.3) * (1 + rng.uniform(0, 0.5) * ramp))[..., None].astype(np.float32)
    cast = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    contrast, mean = np.float32(rng.uniform(0.7, 1.2)), arr.mean()
    if strength != 1.0:  # the same draws, pulled towards no change (1.0 keeps the exact bytes)
        light, cast, contrast = (np.float32(1 + strength * (x - 1)) for x in (light, cast, contrast))
    # (x - mean) * contrast + mean, then the light ramp and colour cast, in as few passes as possible.
    arr *= contrast * cast
    arr += (mean * (1 - contrast)) * cast
    arr *= light
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


def render_view(seed, spec):
    """Photograph the spec's objects; returns (jpeg bytes, (width, height), boxes [[x1, y1, x2, y2], ...]).

    spec: dict with "view" (str, the view's seed key), "objects" (instance keys; 0, 1 or 2),
    "difficulty" (a DIFFICULTIES key), "sides" (min, max longer side), "others" (instance keys that may
    appear as clutter), optional "variant" (int > 0: a near-duplicate of the same view: other JPEG
    quality and a slightly smaller image). Boxes are the objects' visible extents, clipped to the image.
    """
    rng = rng_for(seed, "view", spec["view"])
    diff = DIFFICULTIES[spec["difficulty"]]
    long_side = int(rng.integers(spec["sides"][0], spec["sides"][1] + 1))
    aspect = float(rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3]))
    W, H = (long_side, int(round(long_side / aspect))) if aspect >= 1 else (int(round(long_side * aspect)), long_side)
    objects = list(spec["objects"])
    others = [k for k in spec.get("others", ()) if k not in objects]
    img = _background(rng, seed, (W, H), others, diff.get("clutter", 3))
    boxes = []
    for i, key in enumerate(objects):
        # Two objects (INSTRE-M) stand side by side, each at 2/3 of the size one would have.
        centre = None if len(objects) == 1 else ((0.28 + 0.44 * i) * W + rng.uniform(-0.05, 0.05) * W,
                                                 H / 2 + rng.uniform(-0.1, 0.1) * H)
        quad = _object_quad(rng, instance_texture(seed, key).size, (W, H), diff, centre,
                            1.0 if len(objects) == 1 else 0.67)
        _paste_quad(img, instance_texture(seed, key), quad)
        x0, y0 = np.clip(quad.min(0), 0, [W, H])
        x1, y1 = np.clip(quad.max(0), 0, [W, H])
        boxes.append([float(x0), float(y0), float(x1), float(y1)])
    _occlude(img, rng, seed, boxes, diff, others)
    img = _illumination(img, rng, diff.get("light", 1.0))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    quality = int(rng.integers(70, 96))
    variant = int(spec.get("variant", 0))
    if variant:
        # A near-duplicate: the same photograph re-saved smaller and at another quality.
        vr = rng_for(seed, "variant", spec["view"], variant)
        f = max(vr.uniform(0.8, 0.95), 300 / max(W, H))  # stay within the sets' 300 px minimum
        img = img.resize((int(W * f), int(H * f)), Image.BILINEAR)
        boxes = [[v * f for v in b] for b in boxes]
        quality = int(vr.integers(60, 90))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.size, boxes
