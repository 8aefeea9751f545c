"""Small line and scatter charts drawn with Pillow (no plotting dependency).

Used for the guidance-scale sweep figure: judge accuracy and FID_fm against the
scale, precision against recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .checkpoints import atomic_path

__all__ = ["Series", "Panel", "save_panels"]

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


@dataclass
class Series:
    """One line (or marker set): points (x, y), optional text per point, dashed for reference values."""

    xs: list[float]
    ys: list[float]
    label: str = ""
    point_labels: list[str] | None = None
    dashed: bool = False
    line: bool = True


@dataclass
class Panel:
    """One chart: title, axis labels, series, optional fixed axis ranges (lo, hi)."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    xrange: tuple[float, float] | None = None
    yrange: tuple[float, float] | None = None
    xticks: list[float] | None = None


def _finite(vals):
    return [v for v in vals if v is not None and math.isfinite(v)]


def _range(vals, fixed):
    if fixed is not None:
        return fixed
    vals = _finite(vals)
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return (0.0 if lo >= 0 and lo - pad < 0 else lo - pad), hi + pad


def _dashed(draw, p, q, color, dash=6):
    length = math.dist(p, q)
    steps = max(int(length // dash), 1)
    for i in range(0, steps, 2):
        a, b = i / steps, min((i + 1) / steps, 1.0)
        draw.line([(p[0] + (q[0] - p[0]) * a, p[1] + (q[1] - p[1]) * a),
                   (p[0] + (q[0] - p[0]) * b, p[1] + (q[1] - p[1]) * b)], fill=color, width=2)


def _draw_panel(draw, font, box, panel: Panel) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 15, y0 + 44, y1 - 45
    xr = _range([v for s in panel.series for v in s.xs], panel.xrange)
    yr = _range([v for s in panel.series for v in s.ys], panel.yrange)

    def px(x, y):
        return (left + (x - xr[0]) / (xr[1] - xr[0]) * (right - left),
                bottom - (y - yr[0]) / (yr[1] - yr[0]) * (bottom - top))

    draw.text(((left + right) / 2, y0 + 8), panel.title, fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    xticks = panel.xticks if panel.xticks else [xr[0] + (xr[1] - xr[0]) * i / 4 for i in range(5)]
    for fx in xticks:
        gx, _ = px(fx, yr[0])
        draw.line([(gx, bottom), (gx, bottom + 4)], fill="black")
        draw.text((gx, bottom + 6), f"{fx:.3g}", fill="black", font=font, anchor="mt")
    for i in range(5):
        fy = yr[0] + (yr[1] - yr[0]) * i / 4
        _, gy = px(xr[0], fy)
        draw.line([(left - 4, gy), (left, gy)], fill="black")
        draw.line([(left + 1, gy), (right - 1, gy)], fill=(230, 230, 230))
        draw.text((left - 6, gy), f"{fy:.3g}", fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, y1 - 14), panel.xlabel, fill="black", font=font, anchor="mm")
    draw.text((x0 + 4, top - 14), panel.ylabel, fill="black", font=font, anchor="lm")
    legend_x = right  # legend entries right-aligned in the row above the frame
    for k, s in enumerate(panel.series):
        color = COLORS[k % len(COLORS)]
        pts = [px(x, y) for x, y in zip(s.xs, s.ys) if x is not None and y is not None
               and math.isfinite(x) and math.isfinite(y)]
        if s.line:
            for p, q in zip(pts, pts[1:]):
                (_dashed(draw, p, q, color) if s.dashed else draw.line([p, q], fill=color, width=2))
        for j, (x, y) in enumerate(pts):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            if s.point_labels:
                draw.text((x + 5, y - 5), s.point_labels[j], fill=color, font=font, anchor="ls")
        if s.label:
            legend_x -= draw.textlength(s.label, font=font)
            draw.text((legend_x, top - 14), s.label, fill=color, font=font, anchor="lm")
            draw.line([(legend_x - 22, top - 14), (legend_x - 4, top - 14)], fill=color, width=2)
            legend_x -= 34


def save_panels(panels: list[Panel], path: str | Path, size: tuple[int, int] = (380, 320)) -> Path:
    """Draw the panels side by side into one PNG (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    im = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    for i, panel in enumerate(panels):
        _draw_panel(draw, font, (i * w, 0, (i + 1) * w, h), panel)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path
