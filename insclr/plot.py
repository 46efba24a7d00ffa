"""Line plots drawn with Pillow (no plotting library needed): training curves for the demo and runs."""

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _nice(v):
    return f"{v:.3g}"


def line_panel(draw, box, series, title):
    """Draw one panel into `box` (x0, y0, x1, y1): `series` maps a name to a list of (x, y) points."""
    x0, y0, x1, y1 = box
    pad_l, pad_b, pad_t = 48, 22, 20
    px0, py0, px1, py1 = x0 + pad_l, y0 + pad_t, x1 - 8, y1 - pad_b
    draw.rectangle([px0, py0, px1, py1], outline=(0, 0, 0))
    draw.text((x0 + 4, y0 + 3), title, fill=(0, 0, 0))
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((px0 + 8, py0 + 8), "no data", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax = ymin + (abs(ymin) or 1) * 0.1
    sx = (px1 - px0) / (xmax - xmin)
    sy = (py1 - py0) / (ymax - ymin)
    draw.text((x0 + 2, py0 - 6), _nice(ymax), fill=(0, 0, 0))
    draw.text((x0 + 2, py1 - 6), _nice(ymin), fill=(0, 0, 0))
    draw.text((px0, py1 + 4), _nice(xmin), fill=(0, 0, 0))
    draw.text((px1 - 30, py1 + 4), _nice(xmax), fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [(px0 + (x - xmin) * sx, py1 - (y - ymin) * sy) for x, y in pts]
        if len(xy) == 1:
            draw.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=color)
        else:
            draw.line(xy, fill=color, width=2)
        draw.text((px1 - 150, py0 + 4 + 12 * i), name, fill=color)


def plot_panels(panels, path, width=520, height=260):
    """Save a vertical stack of panels; `panels` is a list of (title, {name: [(x, y), ...]})."""
    img = Image.new("RGB", (width, height * max(1, len(panels))), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (title, series) in enumerate(panels):
        line_panel(draw, (0, i * height, width, (i + 1) * height), series, title)
    img.save(path)
    return path


def smooth(points, window=20):
    """Moving average of (x, y) points over `window` neighbours (for noisy per-step losses)."""
    out, acc = [], []
    for x, y in points:
        acc.append(y)
        if len(acc) > window:
            acc.pop(0)
        out.append((x, sum(acc) / len(acc)))
    return out
