"""A synthetic fashion product catalogue with exact masks.

Nothing can be downloaded at run time, so the demo and the tests draw their own studio photos:
six product types (long pants, shorts, short- and long-sleeved tops and dresses, beachwear and
accessories, light-coloured products), on white, grey, pastel or coloured studio backgrounds
with a soft shadow, in the usual catalogue sizes and aspect ratios.

Every garment is geometry first (smooth outlines, straps, handles), then pixels: the image is
drawn from that geometry with 4x4 super-sampled anti-aliasing, and the mask is the same coverage
thresholded at one half, so mask and image line up to the pixel. Shadows are background.

Everything is drawn from ``np.random.default_rng([seed, index])``: the same config gives
byte-identical images, masks and files.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
from tqdm import tqdm

from tasks.core import layout, storage
from tasks.core.codecs import encode_jpeg, encode_png
from tasks.data.clustering import PRODUCT_TYPES


# Share of each type in a catalogue: rare types are rarer, as in a real shop.
TYPE_WEIGHTS: dict[str, float] = {
    "long_pants": 0.20,
    "shorts": 0.12,
    "short_sleeved": 0.25,
    "long_sleeved": 0.22,
    "beachwear_accessories": 0.09,
    "light_coloured": 0.12,
}

TRUTH_COLUMNS: tuple[str, ...] = (
    "stem", "product_type", "width", "height", "background", "pattern", "expected_reason",
)

_SUPERSAMPLE = 4
_GOLDEN = 0.6180339887498949

# Catalogue canvas sizes (width, height) at full scale, grouped by aspect ratio, with weights.
_SIZE_FAMILIES: tuple[tuple[float, tuple[tuple[int, int], ...]], ...] = (
    (0.45, ((1000, 1333), (750, 1000), (600, 800), (480, 640), (360, 480))),   # portrait 3:4
    (0.20, ((800, 1200), (667, 1000), (533, 800), (320, 480))),                # portrait 2:3
    (0.25, ((1000, 1000), (800, 800), (600, 600), (480, 480))),                # square
    (0.10, ((1200, 900), (800, 600), (1200, 800), (720, 480))),                # landscape 4:3, 3:2
)

_GARMENT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (24, 24, 28), (55, 57, 62), (28, 38, 72), (40, 80, 170), (110, 28, 45), (185, 30, 40),
    (170, 75, 40), (190, 145, 95), (165, 155, 115), (95, 100, 55), (35, 85, 55), (20, 120, 125),
    (205, 160, 40), (225, 115, 150), (150, 125, 190), (125, 128, 132), (100, 70, 50),
    (235, 105, 85), (10, 140, 90), (90, 50, 120), (60, 110, 160), (200, 60, 90),
)
_SWIM_COLOURS: tuple[tuple[int, int, int], ...] = (
    (240, 95, 80), (20, 160, 175), (250, 200, 40), (235, 70, 140), (30, 60, 140), (24, 24, 28),
    (120, 190, 80), (250, 130, 40), (200, 30, 45),
)
_LIGHT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (248, 248, 246), (246, 242, 232), (242, 234, 216), (246, 228, 230), (228, 236, 246),
    (236, 228, 212), (230, 244, 236), (232, 232, 234), (244, 240, 250),
)
_PRINT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (235, 70, 90), (250, 200, 60), (245, 245, 240), (90, 140, 220), (240, 130, 170),
    (250, 150, 60), (150, 90, 190), (40, 40, 45),
)
_PASTELS: tuple[tuple[int, int, int], ...] = (
    (238, 220, 224), (220, 232, 242), (226, 238, 222), (242, 232, 214), (232, 226, 242),
    (246, 240, 206), (214, 232, 230),
)
_BACKDROPS: tuple[tuple[int, int, int], ...] = (
    (245, 205, 70), (60, 95, 185), (238, 125, 105), (60, 150, 150), (238, 145, 60),
    (125, 180, 95), (200, 150, 200), (175, 200, 165), (205, 140, 110),
)
_METALS: tuple[tuple[int, int, int], ...] = ((205, 185, 130), (190, 192, 198), (160, 120, 70))
_DENIM_STITCH = (214, 160, 70)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: ``n`` good products, ``bad`` bad inputs, the seed and the image limits.

    Canvas sizes come from web-catalogue families (long sides 480-1333 px) capped at ``max_side``;
    with ``long_side`` every canvas is scaled, up or down, so that its long side is exactly that
    (a photo studio's camera exports are 2,000-6,000 px).
    """

    n: int
    seed: int = 0
    bad: int = 0
    max_side: int = 1333
    jpeg_quality: int = 92
    long_side: int | None = None

    def __post_init__(self) -> None:
        if self.n < 0 or self.bad < 0:
            raise ValueError("n and bad must be >= 0")
        if self.max_side < 32:
            raise ValueError("max_side must be at least 32 pixels")
        if self.long_side is not None and self.long_side < 32:
            raise ValueError("long_side must be at least 32 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be between 1 and 100")


@dataclass
class SynthItem:
    """One rendered product: RGB image (HxWx3 uint8), exact mask (HxW uint8, 0/255), labels."""

    stem: str
    product_type: str
    image: np.ndarray
    mask: np.ndarray
    background: str
    pattern: str
    style: str = ""


@dataclass
class _Shape:
    """A product as geometry in its own units (y points down); turned into pixels by ``_place``."""

    style: str
    fills: list[np.ndarray]                                     # closed outlines, filled
    strokes: list[tuple[np.ndarray, float]] = field(default_factory=list)   # straps, handles
    regions: list[tuple[np.ndarray, float]] = field(default_factory=list)   # darker areas
    seams: list[np.ndarray] = field(default_factory=list)                   # thin dark lines
    folds: list[np.ndarray] = field(default_factory=list)                   # soft fold shading
    buttons: list[tuple[float, float, float]] = field(default_factory=list)  # x, y, radius
    metal: list[tuple[np.ndarray, float]] = field(default_factory=list)     # buckles, zips
    fill: float = 0.82                                          # share of the frame it spans
    tilt: float = 0.0                                           # radians, e.g. a belt laid diagonally


# --------------------------------------------------------------------------------------------
# Small geometry helpers
# --------------------------------------------------------------------------------------------

def _outline(points: list[tuple[float, float, bool]], iterations: int = 3) -> np.ndarray:
    """Smooth a closed polygon with Chaikin corner cutting; vertices flagged True stay sharp."""
    pts = np.array([(x, y) for x, y, _ in points], dtype=np.float64)
    sharp = [s for _, _, s in points]
    for _ in range(iterations):
        nxt = np.roll(pts, -1, axis=0)
        q = 0.75 * pts + 0.25 * nxt
        r = 0.25 * pts + 0.75 * nxt
        out: list[np.ndarray] = []
        flags: list[bool] = []
        count = len(pts)
        for i in range(count):
            out.append(pts[i] if sharp[i] else q[i])
            flags.append(sharp[i])
            if not sharp[(i + 1) % count]:
                out.append(r[i])
                flags.append(False)
        pts, sharp = np.array(out), flags
    return pts


def _mirror(points: list[tuple[float, float, bool]]) -> list[tuple[float, float, bool]]:
    """Close a right-half outline with its mirror image (x -> -x); points on the axis stay single."""
    return points + [(-x, y, s) for x, y, s in reversed(points) if x != 0.0]


def _curve(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float],
           n: int = 16) -> np.ndarray:
    """Sample a quadratic Bezier curve from ``p0`` to ``p2`` pulled towards ``p1``."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, b, c = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t ** 2 * c


def _line(*points: tuple[float, float]) -> np.ndarray:
    """An open polyline through ``points``."""
    return np.asarray(points, dtype=np.float64)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A closed axis-aligned rectangle."""
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 2 * math.pi,
             n: int = 48) -> np.ndarray:
    """Points on an ellipse arc from angle ``a0`` to ``a1`` (radians)."""
    t = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _jitter(rng: np.random.Generator, points: list[tuple[float, float, bool]], amount: float
            ) -> list[tuple[float, float, bool]]:
    """Move every vertex by a little Gaussian noise so no two garments are quite symmetric."""
    noise = rng.normal(0.0, amount, size=(len(points), 2))
    return [(x + (dx if x != 0.0 else 0.0), y + dy, s) for (x, y, s), (dx, dy) in zip(points, noise)]


def _pick(rng: np.random.Generator, options: dict[str, float]) -> str:
    """Draw one key of ``options`` with probability proportional to its value."""
    keys = list(options)
    weights = np.array([options[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


# --------------------------------------------------------------------------------------------
# Garment shapes
# --------------------------------------------------------------------------------------------

def _trousers(rng: np.random.Generator, short: bool) -> _Shape:
    """Long pants (tall, two legs with a gap) or shorts (short, wide, small gap); waist = 1."""
    hip = rng.uniform(1.02, 1.14)
    rise = rng.uniform(0.52, 0.7)
    band = rng.uniform(0.07, 0.11)
    if short:
        length = rise + rng.uniform(0.12, 0.42)
        hem_out = hip / 2 + rng.uniform(0.0, 0.1)
        hem_in = rng.uniform(0.03, 0.09)
    else:
        length = rng.uniform(2.5, 3.2)
        hem = rng.uniform(0.3, 0.52)
        centre = hip / 4 + max(rng.uniform(0.0, 0.1), hem / 2 - hip / 4 + rng.uniform(0.03, 0.08))
        hem_out, hem_in = centre + hem / 2, centre - hem / 2
    thigh = (hip / 2 + 0.01, rise)
    knee_out = (0.5 * (thigh[0] + hem_out) + 0.01, 0.5 * (rise + length))
    knee_in = (0.5 * hem_in + 0.005, 0.5 * (rise + length))
    right = [
        (0.5, 0.0, True), (hip / 2, rise * 0.45, False), (thigh[0], thigh[1], False),
        (knee_out[0], knee_out[1], False), (hem_out, length, True),
        (hem_in, length + rng.uniform(-0.01, 0.02), True), (knee_in[0], knee_in[1], False),
    ]
    left = [(-x, y, s) for x, y, s in reversed(right)]
    pts = _jitter(rng, right, 0.006) + [(0.0, rise + 0.02, True)] + _jitter(rng, left, 0.006)
    outline = _outline(pts)
    side = 0.5 + (hip / 2 - 0.5) * band / (rise * 0.45)
    shape = _Shape(style="shorts" if short else "trousers", fills=[outline])
    shape.regions.append((_rect(-side - 0.05, -0.05, side + 0.05, band), 0.9))
    shape.seams.append(_line((-side, band), (side, band)))
    fly_x = rng.uniform(0.05, 0.08)
    shape.seams.append(_curve((fly_x, band), (fly_x, rise * 0.8), (0.0, rise * 0.85)))
    for sign in (1.0, -1.0):
        pocket = _curve((0.27, band), (0.3, rise * 0.42), (hip / 2 - 0.01, rise * 0.45))
        shape.seams.append(pocket * np.array([sign, 1.0]))
        for loop_x in (0.12, 0.38):
            shape.seams.append(_line((sign * loop_x, -0.005), (sign * loop_x, band + 0.03)))
        leg_mid = (hem_out + hem_in) / 2
        hem_y = length - (0.035 if not short else 0.03)
        shape.seams.append(_line((sign * (hem_in + 0.01), hem_y), (sign * (hem_out - 0.01), hem_y)))
        shape.folds.append(_line((sign * hip / 4, rise + 0.05), (sign * leg_mid, length - 0.05)))
        for _ in range(int(rng.integers(1, 4))):
            y = rise + (length - rise) * rng.uniform(0.25, 0.9)
            x0, x1 = sign * (hem_in + 0.02), sign * (hem_out - 0.02)
            shape.folds.append(_line((x0, y), ((x0 + x1) / 2, y + rng.uniform(-0.08, 0.08)),
                                     (x1, y + rng.uniform(-0.05, 0.05))))
    shape.buttons.append((0.0, band / 2, band * 0.28))
    if short and rng.random() < 0.35:
        cuff = rng.uniform(0.06, 0.1)
        for sign in (1.0, -1.0):
            shape.regions.append((_rect(sign * (hem_in - 0.05), length - cuff,
                                        sign * (hem_out + 0.05), length + 0.05), 0.88))
    shape.fill = rng.uniform(0.8, 0.9) if not short else rng.uniform(0.72, 0.84)
    return shape


def _neckline(rng: np.random.Generator, neck: float, vneck: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """The inside-back area seen through the front neckline, the neck-rib seam, and the depth."""
    depth = rng.uniform(0.14, 0.3) if vneck else rng.uniform(0.07, 0.16)
    front = [(neck, 0.0, True), (neck * 0.55, depth * 0.85, vneck), (0.0, depth, vneck),
             (-neck * 0.55, depth * 0.85, vneck), (-neck, 0.0, True)]
    inside = _outline(front + [(0.0, 0.035, False)], 2)
    if vneck:
        rib = _line((neck + 0.03, 0.0), (0.0, depth + 0.05), (-neck - 0.03, 0.0))
    else:
        rib = _curve((neck + 0.03, 0.0), (0.0, 2 * depth + 0.06), (-neck - 0.03, 0.0), 24)
    return inside, rib, depth


def _sleeve(shoulder: tuple[float, float], armpit: tuple[float, float], angle: float,
            length: float, cuff_ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right sleeve from the shoulder-armpit seam at ``angle`` below horizontal.

    Returns the sleeve outline, its cuff line (upper, lower point) and a cuff band outline.
    """
    s, a = np.array(shoulder), np.array(armpit)
    d = np.array([math.cos(angle), math.sin(angle)])
    n = np.array([math.sin(angle), -math.cos(angle)])
    mid = (s + a) / 2
    half = np.linalg.norm(s - a) / 2 * cuff_ratio
    centre = mid + length * d
    upper, lower = centre + half * n, centre - half * n
    cap = (s + upper) / 2 + n * 0.02
    pts = [(s[0] - 0.05, s[1] + 0.01, True), (cap[0], cap[1], False), (upper[0], upper[1], True),
           (lower[0], lower[1], True), (a[0] - 0.05, a[1], True)]
    outline = _outline(pts, 2)
    band = 0.07 * length / max(length, 0.6)
    cuff = np.array([upper, lower, lower - band * d, upper - band * d])
    return outline, np.array([upper - band * d, lower - band * d]), cuff


def _top(rng: np.random.Generator, long_sleeves: bool) -> _Shape:
    """A short- or long-sleeved top or dress (tee, blouse, shirt, sweater, dress); chest = 1."""
    if long_sleeves:
        style = _pick(rng, {"sweater": 0.3, "shirt": 0.25, "dress": 0.2, "tee": 0.15, "cardigan": 0.1})
    else:
        style = _pick(rng, {"tee": 0.45, "blouse": 0.15, "dress": 0.25, "shirt": 0.15})
    neck = rng.uniform(0.13, 0.19)
    shoulder = (rng.uniform(0.42, 0.48), rng.uniform(0.06, 0.12))
    armpit = (0.5, rng.uniform(0.3, 0.4))
    nip, hem_half = rng.uniform(0.0, 0.03), rng.uniform(0.47, 0.55)
    length = rng.uniform(1.05, 1.4)
    waist_y = length * 0.6
    if style == "dress":
        length = rng.uniform(1.8, 2.6)
        waist_y, nip, hem_half = rng.uniform(0.65, 0.85), rng.uniform(0.04, 0.1), rng.uniform(0.56, 0.85)
    elif style in ("sweater", "cardigan"):
        length = rng.uniform(1.0, 1.3)
    hem_side = length - (0.08 if style == "shirt" else 0.0)
    right = [(neck, 0.0, True), (shoulder[0], shoulder[1], True), (armpit[0], armpit[1], True),
             (0.5 - nip, waist_y, False), (hem_half, hem_side, True)]
    body = _jitter(rng, right, 0.004)
    pts = body + [(0.0, length + 0.01, False)] + [(-x, y, s) for x, y, s in reversed(body)]
    pts += [(0.0, 0.035, False)]
    shape = _Shape(style=style, fills=[_outline(pts)])
    if long_sleeves:
        angle = math.radians(rng.uniform(60, 84) if rng.random() < 0.8 else rng.uniform(35, 60))
        sleeve_len, cuff_ratio = rng.uniform(0.95, 1.3), rng.uniform(0.45, 0.62)
    else:
        angle = math.radians(rng.uniform(15, 45))
        sleeve_len, cuff_ratio = rng.uniform(0.2, 0.38), rng.uniform(0.75, 0.95)
    for sign in (1.0, -1.0):
        jitter = rng.uniform(-0.06, 0.06)
        outline, cuff_line, cuff = _sleeve(shoulder, armpit, angle + jitter, sleeve_len, cuff_ratio)
        flip = np.array([sign, 1.0])
        shape.fills.append(outline * flip)
        shape.seams.append(_line(shoulder, armpit) * flip)
        if long_sleeves or style == "tee":
            shape.seams.append(cuff_line * flip)
        if long_sleeves:
            shape.regions.append((cuff * flip, 0.9))
            elbow = (np.array(armpit) + np.array([math.cos(angle), math.sin(angle)]) * sleeve_len * 0.5)
            shape.folds.append(_line((elbow[0] - 0.06, elbow[1]), (elbow[0] + 0.1, elbow[1] + 0.03)) * flip)
        shape.folds.append(_line((0.44, armpit[1] + 0.05), (0.15, armpit[1] + rng.uniform(0.2, 0.4))) * flip)
    _top_details(rng, shape, style, neck, length, waist_y, hem_half)
    shape.fill = rng.uniform(0.78, 0.9)
    return shape


def _top_details(rng: np.random.Generator, shape: _Shape, style: str, neck: float, length: float,
                 waist_y: float, hem_half: float) -> None:
    """Add neckline, collar, placket, buttons, hem and skirt folds to a top or dress."""
    inside, rib, depth = _neckline(rng, neck, vneck=style in ("blouse", "cardigan") or rng.random() < 0.2)
    shape.regions.append((inside, 0.8))
    if style != "shirt":
        shape.seams.append(rib)
    if style == "shirt":
        stand = _outline([(-neck - 0.02, 0.03, True), (-neck, -0.04, True), (neck, -0.04, True),
                          (neck + 0.02, 0.03, True)], 1)
        shape.fills.append(stand)
        for sign in (1.0, -1.0):
            leaf = np.array([(sign * (neck + 0.01), -0.01), (sign * 0.015, depth),
                             (sign * (neck + 0.06), depth * 0.7)])
            shape.regions.append((leaf, 0.92))
            shape.seams.append(np.vstack([leaf, leaf[:1]]))
    if style in ("shirt", "cardigan"):
        for sign in (1.0, -1.0):
            shape.seams.append(_line((sign * 0.035, depth), (sign * 0.035, length - 0.02)))
        count = int(rng.integers(5, 8))
        for y in np.linspace(depth + 0.08, length - 0.12, count):
            shape.buttons.append((0.0, float(y), 0.018))
    if style == "dress":
        shape.seams.append(_line((-0.46, waist_y), (0.46, waist_y)))
        for x in np.linspace(-0.3, 0.3, int(rng.integers(3, 6))):
            shape.folds.append(_line((x * 0.8, waist_y + 0.05), (x * hem_half * 2.2, length - 0.03)))
        if rng.random() < 0.4:
            shape.regions.append((_rect(-0.6, waist_y - 0.04, 0.6, waist_y + 0.04), 0.8))
    else:
        shape.seams.append(_line((-hem_half, length - 0.05), (hem_half, length - 0.05)))
    if style in ("sweater", "cardigan"):
        shape.regions.append((_rect(-hem_half - 0.1, length - 0.1, hem_half + 0.1, length + 0.1), 0.9))
    for _ in range(int(rng.integers(1, 4))):
        y = rng.uniform(0.45, length - 0.1)
        middle = (0.0, y + rng.uniform(-0.1, 0.1))
        shape.folds.append(_line((-0.4, y), middle, (0.4, y + rng.uniform(-0.08, 0.08))))


def _swimsuit(rng: np.random.Generator) -> _Shape:
    """A one-piece swimsuit with strap loops; hip width = 1."""
    w = rng.uniform(0.9, 1.05)
    right = [(0.0, rng.uniform(0.32, 0.42), False), (0.19, 0.22, True), (0.31, 0.24, True),
             (0.42 * w, 0.42, False), (0.35 * w, 0.76, False), (0.47, 1.0, True),
             (0.24, 1.17, False), (0.09, 1.32, True)]
    shape = _Shape(style="swimsuit", fills=[_outline(_mirror(_jitter(rng, right, 0.004)))])
    for sign in (1.0, -1.0):
        strap = _curve((0.2, 0.24), (0.25, -0.12), (0.3, 0.25), 20) * np.array([sign, 1.0])
        shape.strokes.append((strap, 0.035))
        shape.seams.append(_curve((0.05, 0.5), (0.2, 0.55), (0.38, 0.45)) * np.array([sign, 1.0]))
    shape.fill = rng.uniform(0.62, 0.78)
    return shape


def _bikini(rng: np.random.Generator) -> _Shape:
    """A two-piece bikini: triangle cups on a string, and briefs below; width = 1."""
    shape = _Shape(style="bikini", fills=[])
    cup = rng.uniform(0.24, 0.3)
    for sign in (1.0, -1.0):
        tri = [(0.03, 0.32, True), (0.03 + cup, 0.32, True), (0.03 + cup * 0.45, 0.05, True)]
        shape.fills.append(_outline([(sign * x, y, s) for x, y, s in tri], 1))
        tip = (sign * (0.03 + cup * 0.45), 0.06)
        shape.strokes.append((_curve(tip, (sign * 0.05, -0.08), (sign * 0.0, -0.1)), 0.018))
        band = _curve((sign * (0.03 + cup), 0.31), (sign * 0.42, 0.33), (sign * 0.5, 0.28))
        shape.strokes.append((band, 0.02))
    shape.strokes.append((_line((-0.04, 0.31), (0.04, 0.31)), 0.02))
    top_y = rng.uniform(0.55, 0.62)
    right = [(0.36, top_y, True), (0.32, top_y + 0.08, False), (0.12, top_y + 0.25, False),
             (0.07, top_y + 0.33, True)]
    shape.fills.append(_outline(_mirror(right)))
    for sign in (1.0, -1.0):
        tie = _curve((sign * 0.35, top_y + 0.01), (sign * 0.45, top_y + 0.1), (sign * 0.42, top_y + 0.22))
        shape.strokes.append((tie, 0.02))
    shape.fill = rng.uniform(0.6, 0.75)
    return shape


def _sports_bra(rng: np.random.Generator) -> _Shape:
    """A racer-back sports bra with an elastic under-band; width = 1."""
    right = [(0.0, rng.uniform(0.22, 0.3), False), (0.14, 0.0, True), (0.23, 0.0, True),
             (0.28, 0.28, False), (0.47, 0.44, True), (0.46, 0.74, True), (0.0, 0.76, False)]
    shape = _Shape(style="sports_bra", fills=[_outline(_mirror(_jitter(rng, right, 0.004)))])
    shape.regions.append((_rect(-0.6, 0.62, 0.6, 0.8), 0.8))
    shape.seams.append(_line((-0.46, 0.62), (0.46, 0.62)))
    shape.fill = rng.uniform(0.55, 0.7)
    return shape


def _bag(rng: np.random.Generator) -> _Shape:
    """A tote bag with two handles (the space inside a handle is background); width = 1."""
    top = rng.uniform(0.35, 0.45)
    taper = rng.uniform(0.0, 0.08)
    body = [(-0.5 + taper, top, True), (0.5 - taper, top, True), (0.5, 1.0, False), (0.46, 1.04, False),
            (-0.46, 1.04, False), (-0.5, 1.0, False)]
    shape = _Shape(style="bag", fills=[_outline(body, 2)])
    apex = rng.uniform(-0.15, 0.1)
    spread = rng.uniform(0.18, 0.28)
    for dx in (0.0, rng.uniform(0.03, 0.07)):
        handle = _curve((-spread + dx, top + 0.02), (dx, 2 * apex - top), (spread + dx, top + 0.02), 24)
        shape.strokes.append((handle, rng.uniform(0.035, 0.055)))
    shape.seams.append(_line((-0.5 + taper, top + 0.06), (0.5 - taper, top + 0.06)))
    if rng.random() < 0.5:
        shape.regions.append((_rect(-0.25, top + 0.2, 0.25, top + 0.45), 0.9))
    shape.fill = rng.uniform(0.55, 0.72)
    return shape


def _cap(rng: np.random.Generator) -> _Shape:
    """A baseball cap seen from the side: crown and brim; crown width = 1."""
    crown = _ellipse(0.0, 0.55, 0.5, rng.uniform(0.45, 0.55), math.pi, 2 * math.pi, 40)
    brim_len = rng.uniform(0.35, 0.5)
    brim = np.array([(0.45, 0.5), (0.5 + brim_len, 0.6), (0.48 + brim_len, 0.68), (0.3, 0.62),
                     (-0.5, 0.6)])
    shape = _Shape(style="cap", fills=[np.vstack([crown, brim])])
    for x in (-0.2, 0.15):
        shape.seams.append(_curve((0.0, 0.05), (x, 0.2), (x * 1.5, 0.55)))
    under_brim = np.array([(0.4, 0.52), (0.5 + brim_len, 0.6), (0.48 + brim_len, 0.7), (0.3, 0.7)])
    shape.regions.append((under_brim, 0.85))
    shape.buttons.append((0.0, 0.03, 0.03))
    shape.fill = rng.uniform(0.5, 0.65)
    return shape


def _belt(rng: np.random.Generator) -> _Shape:
    """A belt laid straight with a buckle frame; length = 3."""
    h = rng.uniform(0.12, 0.16)
    strap = [(-1.5, 0.0, True), (1.35, 0.0, True), (1.5, h / 2, True), (1.35, h, True), (-1.5, h, True)]
    shape = _Shape(style="belt", fills=[_outline(strap, 1)])
    shape.metal.append((np.array([(-1.42, -0.05), (-1.25, -0.05), (-1.25, h + 0.05), (-1.42, h + 0.05),
                                  (-1.42, -0.05)]), 0.025))
    for x in np.linspace(0.7, 1.1, 5):
        shape.buttons.append((float(x), h / 2, h * 0.12))
    shape.seams.append(_line((-1.2, 0.02), (1.3, 0.02)))
    shape.seams.append(_line((-1.2, h - 0.02), (1.3, h - 0.02)))
    shape.fill = rng.uniform(0.75, 0.88)
    shape.tilt = math.radians(rng.uniform(25, 40)) * (1 if rng.random() < 0.5 else -1)
    return shape


def _sun_hat(rng: np.random.Generator) -> _Shape:
    """A wide-brimmed sun hat seen from the front: brim, crown and ribbon band; brim width = 2."""
    brim_ry, crown_ry = rng.uniform(0.2, 0.3), rng.uniform(0.45, 0.6)
    brim = _ellipse(0.0, 0.55, 1.0, brim_ry, n=72)
    crown = _ellipse(0.0, 0.55, 0.45, crown_ry, math.pi, 2 * math.pi, 40)
    shape = _Shape(style="sun_hat", fills=[brim, crown])
    lift = math.asin(min(0.9, 0.08 / crown_ry))
    left = _ellipse(0.0, 0.55, 0.45, crown_ry, math.pi, math.pi + lift, 8)
    right = _ellipse(0.0, 0.55, 0.45, crown_ry, 2 * math.pi - lift, 2 * math.pi, 8)
    shape.regions.append((np.vstack([left, right]), rng.uniform(0.55, 0.8)))
    shape.seams.append(_ellipse(0.0, 0.55, 0.88, brim_ry * 0.86, 0.0, math.pi, 40))
    shape.seams.append(_ellipse(0.0, 0.55, 0.72, brim_ry * 0.7, 0.0, math.pi, 40))
    shape.fill = rng.uniform(0.65, 0.8)
    return shape


_ACCESSORIES: dict[str, tuple[float, Callable[[np.random.Generator], _Shape]]] = {
    "swimsuit": (0.2, _swimsuit), "bikini": (0.2, _bikini), "sports_bra": (0.15, _sports_bra),
    "bag": (0.2, _bag), "cap": (0.1, _cap), "belt": (0.08, _belt), "sun_hat": (0.07, _sun_hat),
}


def _accessory(rng: np.random.Generator) -> _Shape:
    """One beachwear, sportswear or accessory item."""
    name = _pick(rng, {k: w for k, (w, _) in _ACCESSORIES.items()})
    return _ACCESSORIES[name][1](rng)


def _shape_for(product_type: str, rng: np.random.Generator) -> _Shape:
    """The garment geometry for a product type (light-coloured products take any shape)."""
    if product_type == "light_coloured":
        product_type = _pick(rng, {"long_pants": 0.2, "shorts": 0.1, "short_sleeved": 0.3,
                                   "long_sleeved": 0.3, "beachwear_accessories": 0.1})
    if product_type in ("long_pants", "shorts"):
        return _trousers(rng, short=product_type == "shorts")
    if product_type in ("short_sleeved", "long_sleeved"):
        return _top(rng, long_sleeves=product_type == "long_sleeved")
    return _accessory(rng)


# --------------------------------------------------------------------------------------------
# Placement: garment units -> pixels
# --------------------------------------------------------------------------------------------

def _all_points(shape: _Shape) -> np.ndarray:
    """Every point that bounds the product (outlines, strokes padded by their width)."""
    parts = list(shape.fills)
    for pts, width in shape.strokes + shape.metal:
        for dx, dy in ((-1, -1), (1, 1), (-1, 1), (1, -1)):
            parts.append(pts + np.array([dx, dy]) * width / 2)
    return np.vstack(parts)


def _place(shape: _Shape, rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, float]:
    """An affine map (2x3) from garment units to pixels that fits the product in the frame.

    The product is turned by a degree or two, scaled to ``shape.fill`` of the limiting side and
    put a little above the centre (room for a floor shadow). Returns the map and its scale.
    """
    angle = shape.tilt + math.radians(rng.normal(0.0, 1.2))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = _all_points(shape) @ rot.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    size = np.maximum(hi - lo, 1e-6)
    scale = min(shape.fill * width / size[0], shape.fill * 0.96 * height / size[1])
    span = size * scale
    slack = np.array([width, height]) - span
    centre = np.array([width / 2 + rng.uniform(-0.15, 0.15) * slack[0],
                       height / 2 - rng.uniform(0.1, 0.3) * slack[1]])
    offset = centre - (lo + hi) / 2 * scale
    matrix = np.hstack([rot * scale, offset[:, None]])
    return matrix, scale


def _apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine map to an (N, 2) array of points."""
    return pts @ matrix[:, :2].T + matrix[:, 2]


def _fixed(pts: np.ndarray, origin: np.ndarray, factor: float, shift: int = 4) -> np.ndarray:
    """Pixel points -> int32 fixed-point coordinates of a canvas starting at ``origin``.

    ``factor`` scales to a super-sampled or reduced canvas; pixel centres stay centres.
    """
    local = (pts - origin) * factor + (factor - 1) / 2
    return np.round(local * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)


def _coverage(shape: _Shape, matrix: np.ndarray, scale: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Product coverage (uint8, 0-255) of each pixel in ``box`` from 4x4 super-sampling."""
    x0, y0, x1, y1 = box
    f = _SUPERSAMPLE
    canvas = np.zeros(((y1 - y0) * f, (x1 - x0) * f), np.uint8)
    origin = np.array([x0, y0], dtype=np.float64)
    for pts in shape.fills:
        cv2.fillPoly(canvas, [_fixed(_apply(matrix, pts), origin, f)], 255, cv2.LINE_8, 4)
    for pts, width in shape.strokes + shape.metal:
        thick = max(1, int(round(width * scale * f)))
        cv2.polylines(canvas, [_fixed(_apply(matrix, pts), origin, f)], False, 255, thick, cv2.LINE_8, 4)
    return cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)


def _box(shape: _Shape, matrix: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) that holds the whole product, with a small margin."""
    pts = _apply(matrix, _all_points(shape))
    lo = np.floor(pts.min(axis=0)).astype(int) - 3
    hi = np.ceil(pts.max(axis=0)).astype(int) + 4
    return max(0, lo[0]), max(0, lo[1]), min(width, hi[0]), min(height, hi[1])


# --------------------------------------------------------------------------------------------
# Colours, patterns, shading
# --------------------------------------------------------------------------------------------

def _vary(rng: np.random.Generator, colour: tuple[int, int, int], amount: float = 0.08) -> np.ndarray:
    """A colour with a little random brightness and tint change."""
    c = np.asarray(colour, dtype=np.float32) * rng.uniform(1 - amount, 1 + amount)
    c += rng.normal(0.0, 255 * amount / 3, size=3).astype(np.float32)
    return np.clip(c, 0, 255).astype(np.float32)


def _garment_colour(rng: np.random.Generator, product_type: str, style: str, pattern: str) -> np.ndarray:
    """The main colour of a product: pale for light-coloured ones, indigo for denim, else a fashion colour."""
    if pattern == "denim":
        return _vary(rng, (48, 66, 112) if rng.random() < 0.7 else (95, 120, 165), 0.1)
    if product_type == "light_coloured":
        c = np.asarray(_LIGHT_COLOURS[int(rng.integers(len(_LIGHT_COLOURS)))], dtype=np.float32)
        return np.clip(c * rng.uniform(0.95, 1.0), 0, 255)
    palette = _SWIM_COLOURS if style in ("swimsuit", "bikini", "sports_bra") else _GARMENT_COLOURS
    colour = _vary(rng, palette[int(rng.integers(len(palette)))])
    brightest = colour.max()
    if brightest > 215 and colour.min() > 150:          # too pale: that is the light-coloured type
        colour *= 200.0 / brightest
    return colour


def _pattern_kind(rng: np.random.Generator, product_type: str, style: str) -> str:
    """Choose a pattern name that suits the product."""
    if product_type == "light_coloured":
        return _pick(rng, {"solid": 0.6, "knit": 0.15, "stripes": 0.12, "dots": 0.08, "floral": 0.05})
    if style in ("trousers", "shorts"):
        return _pick(rng, {"solid": 0.35, "denim": 0.35, "checks": 0.1, "stripes": 0.1, "floral": 0.1})
    if style in ("bag", "cap", "belt", "sun_hat"):
        return _pick(rng, {"solid": 0.7, "stripes": 0.15, "checks": 0.1, "knit": 0.05})
    if style in ("swimsuit", "bikini", "sports_bra"):
        return _pick(rng, {"solid": 0.4, "floral": 0.25, "stripes": 0.2, "dots": 0.15})
    if style in ("sweater", "cardigan"):
        return _pick(rng, {"knit": 0.55, "solid": 0.25, "stripes": 0.2})
    return _pick(rng, {"solid": 0.35, "stripes": 0.2, "dots": 0.1, "checks": 0.12, "floral": 0.15,
                       "knit": 0.08})


def _second_colour(rng: np.random.Generator, base: np.ndarray, light: bool) -> np.ndarray:
    """A colour that stands out on ``base`` (only faintly for light-coloured products)."""
    if light:
        return np.clip(base - rng.uniform(12, 30, size=3).astype(np.float32), 0, 255)
    if base.mean() < 110 or rng.random() < 0.5:
        option = _PRINT_COLOURS[int(rng.integers(len(_PRINT_COLOURS)))]
        if abs(np.mean(option) - base.mean()) < 60:
            option = (245, 245, 240) if base.mean() < 128 else (30, 30, 35)
        return _vary(rng, option, 0.04)
    return np.array((245, 245, 240) if rng.random() < 0.6 else (25, 28, 45), dtype=np.float32)


def _band(coord: np.ndarray, period: float, duty: float, phase: float) -> np.ndarray:
    """Anti-aliased 0..1 coverage of stripes of ``period`` px, ``duty`` of each period wide."""
    t = np.mod((coord + phase) / period, 1.0)
    dist = np.minimum(np.abs(t - duty / 2), 1.0 - np.abs(t - duty / 2)) * period
    return np.clip(duty * period / 2 - dist + 0.5, 0.0, 1.0).astype(np.float32)


def _mix(c1: np.ndarray, c2: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Blend colour ``c1`` to ``c2`` by ``amount`` (any shape broadcastable to HxW)."""
    return c1 + (c2 - c1) * amount[..., None]


def _floral_tile(rng: np.random.Generator, size: int, ground: np.ndarray, light: bool) -> np.ndarray:
    """One seamless square tile of a small flower print on ``ground``."""
    tile = np.empty((size, size, 3), np.uint8)
    tile[:] = np.clip(ground, 0, 255).astype(np.uint8)
    petal = _second_colour(rng, ground, light)
    heart = (250, 215, 80) if not light else tuple(float(v) for v in ground - 25)
    leaf = (70, 130, 70) if not light else tuple(float(v) for v in ground - 15)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.05, 0.1)
        turn = rng.uniform(0, 2 * math.pi)
        for ox in (-size, 0, size):
            for oy in (-size, 0, size):
                lx, ly = cx + ox + 1.6 * r * math.cos(turn), cy + oy + 1.6 * r * math.sin(turn)
                cv2.ellipse(tile, (int(lx), int(ly)), (max(1, int(r * 0.9)), max(1, int(r * 0.45))),
                            math.degrees(turn), 0, 360, leaf, -1, cv2.LINE_AA)
                for k in range(5):
                    a = turn + k * 2 * math.pi / 5
                    px, py = cx + ox + r * math.cos(a), cy + oy + r * math.sin(a)
                    cv2.circle(tile, (int(px), int(py)), max(1, int(r * 0.75)),
                               tuple(float(v) for v in petal), -1, cv2.LINE_AA)
                cv2.circle(tile, (int(cx + ox), int(cy + oy)), max(1, int(r * 0.45)), heart, -1, cv2.LINE_AA)
    return tile


def _tiled(tile: np.ndarray, h: int, w: int) -> np.ndarray:
    """Repeat a tile (PxQ or PxQx3) over an h x w box."""
    reps = (h // tile.shape[0] + 1, w // tile.shape[1] + 1) + (1,) * (tile.ndim - 2)
    return np.tile(tile, reps)[:h, :w]


def _dots_tile(step: int, radius: float) -> np.ndarray:
    """One period (step x step) of a staggered polka-dot coverage map, anti-aliased."""
    c = np.arange(step, dtype=np.float32)
    dist2 = None
    for off in (0.0, step / 2):
        d = np.mod(c + off, step) - step / 2
        d2 = d[:, None] ** 2 + d[None, :] ** 2
        dist2 = d2 if dist2 is None else np.minimum(dist2, d2)
    return np.clip((radius * radius - dist2) / (2 * radius) + 0.5, 0.0, 1.0).astype(np.float32)


def _pattern(kind: str, rng: np.random.Generator, h: int, w: int, unit: float, base: np.ndarray,
             light: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The flat fabric of a product over an h x w box; ``unit`` is the garment scale in px.

    Returns ``(colour, modulation)``: ``colour`` is float32 RGB broadcastable to (h, w, 3) (a
    plain (3,) colour for solid fabrics) and ``modulation`` an optional brightness factor
    broadcastable to (h, w) for weave textures (denim twill, knit ribs).
    """
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    if kind == "solid":
        return base, None
    if kind == "stripes":
        other = _second_colour(rng, base, light)
        period = max(3.0, unit * rng.uniform(0.035, 0.12))
        duty = rng.uniform(0.2, 0.55)
        direction = _pick(rng, {"h": 0.6, "v": 0.3, "d": 0.1})
        if direction == "d":
            size = max(2, int(round(period * 1.41421356)))
            c = np.arange(size, dtype=np.float32)
            amount = _band((c[:, None] + c[None, :]) * (period / size), period, duty, 0.0)
            return _mix(base, other, _tiled(amount, h, w)), None
        coord = ys if direction == "h" else xs
        return _mix(base, other, _band(coord, period, duty, rng.uniform(0, period))), None
    if kind == "checks":
        other = _second_colour(rng, base, light)
        period = max(4.0, unit * rng.uniform(0.04, 0.1))
        phase = rng.uniform(0, period)
        half = (other - base) * 0.5
        rows = base + half * _band(ys, period, 0.5, phase)[..., None]
        return rows + half * _band(xs, period, 0.5, phase)[..., None], None
    if kind == "dots":
        other = _second_colour(rng, base, light)
        step = max(5, int(round(unit * rng.uniform(0.05, 0.1))))
        amount = _dots_tile(step, step * rng.uniform(0.14, 0.26))
        return _tiled(_mix(base, other, amount), h, w), None
    if kind == "floral":
        tile = _floral_tile(rng, max(12, int(unit * rng.uniform(0.16, 0.3))), base, light)
        return _tiled(tile, h, w).astype(np.float32), None
    if kind == "denim":
        period = max(3, int(round(unit * 0.012)))
        c = np.arange(period, dtype=np.float32)
        twill = 0.5 + 0.5 * np.sin((c[:, None] + c[None, :]) * (2 * math.pi / period))
        streaks = cv2.resize(rng.normal(0, 1, (max(2, h // 40), w)).astype(np.float32), (w, h))
        return base, 1.0 + 0.07 * _tiled(twill.astype(np.float32), h, w) + 0.05 * streaks
    if kind == "knit":
        rib = 0.5 + 0.5 * np.sin(xs * (2 * math.pi / max(2.5, unit * rng.uniform(0.012, 0.025))))
        return base, (1.0 - 0.08 * rib).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}")


def _colourise(colour: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """Fabric colour times shading -> HxWx3 uint8 (a plain colour takes the fast path)."""
    if colour.ndim == 1:
        return cv2.merge([cv2.convertScaleAbs(shade, alpha=float(c)) for c in colour])
    return cv2.convertScaleAbs(colour * shade[..., None])


def _shading(shape: _Shape, rng: np.random.Generator, matrix: np.ndarray, scale: float,
             box: tuple[int, int, int, int], alpha: np.ndarray, light: bool) -> np.ndarray:
    """Multiplicative light over the product box (HxW float32): folds, lighting, darker edges.

    Drawn on a reduced canvas (long side <= 200 px) and scaled up, since it is all smooth.
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    f = max(1, math.ceil(max(w, h) / 200))
    lw, lh = max(2, math.ceil(w / f)), max(2, math.ceil(h / f))
    origin = np.array([x0, y0], dtype=np.float64)
    dark = np.zeros((lh, lw), np.float32)
    bright = np.zeros((lh, lw), np.float32)
    thick = max(1, int(round(scale * 0.03 / f)))
    for pts in shape.folds + _random_folds(shape, rng):
        strength = float(rng.uniform(0.5, 1.0))
        px = _fixed(_apply(matrix, pts), origin, 1.0 / f)
        cv2.polylines(dark, [px], False, strength, thick, cv2.LINE_AA, 4)
        cv2.polylines(bright, [px + np.int32(thick * 2 * 16)], False, strength, thick, cv2.LINE_AA, 4)
    sigma = max(0.8, scale * 0.02 / f)
    dark = cv2.GaussianBlur(dark, (0, 0), sigma)
    bright = cv2.GaussianBlur(bright, (0, 0), sigma)
    v = np.linspace(-0.5, 0.5, lh, dtype=np.float32)[:, None]
    u = np.linspace(-0.5, 0.5, lw, dtype=np.float32)[None, :]
    light_map = 1.0 + rng.uniform(-0.1, 0.02) * v + rng.uniform(-0.06, 0.06) * u
    blotch = cv2.resize(rng.normal(0, 1, (4, 4)).astype(np.float32), (lw, lh), interpolation=cv2.INTER_CUBIC)
    small_alpha = cv2.resize(alpha, (lw, lh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    edge = cv2.GaussianBlur(small_alpha, (0, 0), max(0.7, scale * 0.015 / f))
    edge_depth = rng.uniform(0.22, 0.35) if light else rng.uniform(0.1, 0.2)
    fold_depth = rng.uniform(0.12, 0.22) if not light else rng.uniform(0.06, 0.12)
    shade = light_map * (1.0 - fold_depth * dark + 0.5 * fold_depth * bright + 0.02 * blotch)
    shade *= 1.0 - edge_depth * np.clip(1.0 - edge, 0.0, 1.0)
    return cv2.resize(shade, (w, h), interpolation=cv2.INTER_LINEAR)


def _grain(rng: np.random.Generator, h: int, w: int, amount: float) -> np.ndarray:
    """Fine multiplicative fabric grain around 1.0 (HxW float32)."""
    noise = rng.normal(0.0, amount, (max(1, h // 2), max(1, w // 2))).astype(np.float32)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR) + np.float32(1.0)


def _random_folds(shape: _Shape, rng: np.random.Generator) -> list[np.ndarray]:
    """A few extra soft creases anywhere across the product."""
    pts = np.vstack(shape.fills)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    folds = []
    for _ in range(int(rng.integers(2, 6))):
        a = lo + (hi - lo) * rng.uniform(0.1, 0.9, 2)
        b = a + (hi - lo) * rng.uniform(-0.25, 0.25, 2)
        folds.append(np.vstack([a, b]))
    return folds


def _details(shape: _Shape, matrix: np.ndarray, scale: float, box: tuple[int, int, int, int],
             rng: np.random.Generator) -> np.ndarray:
    """Darkening (0..1, HxW float32) from seams and darker areas (waistband, inside neckline)."""
    x0, y0, x1, y1 = box
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    origin = np.array([x0, y0], dtype=np.float64)
    for pts, factor in shape.regions:
        px = _fixed(_apply(matrix, pts), origin, 1.0)
        cv2.fillPoly(canvas, [px], int(255 * (1 - factor)), cv2.LINE_AA, 4)
    seam_px = max(1, int(round(scale * 0.004)))
    seam_dark = int(rng.uniform(40, 70))
    for pts in shape.seams:
        px = _fixed(_apply(matrix, pts), origin, 1.0)
        cv2.polylines(canvas, [px], False, seam_dark, seam_px, cv2.LINE_AA, 4)
    return canvas


def _dashed(img: np.ndarray, pts: np.ndarray, colour: tuple[float, float, float], dash: float,
            thickness: int) -> None:
    """Draw a dashed polyline (top-stitching) into ``img`` in place; ``pts`` in image pixels."""
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    total = float(seg.sum())
    if total < 2 * dash:
        return
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    marks = np.arange(0.0, total, dash)
    xs = np.interp(marks, cum, pts[:, 0])
    ys = np.interp(marks, cum, pts[:, 1])
    for i in range(0, len(marks) - 1, 2):
        cv2.line(img, (int(round(xs[i] * 16)), int(round(ys[i] * 16))),
                 (int(round(xs[i + 1] * 16)), int(round(ys[i + 1] * 16))), colour, thickness, cv2.LINE_AA, 4)


def _button_colour(img: np.ndarray, centre: np.ndarray, style: str, pattern: str,
                   metal: tuple[float, ...]) -> tuple[float, ...]:
    """Metal rivets on trousers, dark holes in belts, pearl or darker buttons elsewhere."""
    if style == "belt":
        return (22.0, 20.0, 20.0)
    if style in ("trousers", "shorts", "cap") or pattern == "denim":
        return metal
    yy = int(np.clip(centre[1], 0, img.shape[0] - 1))
    xx = int(np.clip(centre[0], 0, img.shape[1] - 1))
    under = img[yy, xx].astype(np.float32)
    if under.mean() < 128:
        return (236.0, 233.0, 226.0)
    return tuple(float(v) for v in under * 0.7)


def _hardware(img: np.ndarray, shape: _Shape, matrix: np.ndarray, scale: float, origin: np.ndarray,
              rng: np.random.Generator, pattern: str) -> None:
    """Draw buttons, buckles and denim top-stitching on the product texture (uint8, in place)."""
    metal = tuple(float(v) for v in _METALS[int(rng.integers(len(_METALS)))])
    for x, y, r in shape.buttons:
        centre = _apply(matrix, np.array([[x, y]]))[0] - origin
        colour = _button_colour(img, centre, shape.style, pattern, metal)
        cv2.circle(img, (int(round(centre[0] * 16)), int(round(centre[1] * 16))),
                   int(round(max(1.0, r * scale) * 16)), colour, -1, cv2.LINE_AA, 4)
    for pts, width in shape.metal:
        px = _fixed(_apply(matrix, pts), origin, 1.0)
        cv2.polylines(img, [px], False, metal, max(1, int(round(width * scale))), cv2.LINE_AA, 4)
    if pattern == "denim":
        thick = max(1, int(round(scale * 0.004)))
        for pts in shape.seams:
            px = _apply(matrix, pts) - origin
            _dashed(img, px + np.array([0.0, scale * 0.012]), _DENIM_STITCH, max(2.0, scale * 0.02), thick)


# --------------------------------------------------------------------------------------------
# Backgrounds and shadows
# --------------------------------------------------------------------------------------------

def _background_kind(rng: np.random.Generator, light: bool) -> str:
    """A studio background: light ones for light-coloured products, any studio look otherwise."""
    if light:
        return _pick(rng, {"white": 0.5, "light_grey": 0.3, "cream": 0.2})
    return _pick(rng, {"white": 0.4, "grey_gradient": 0.25, "pastel": 0.2, "colour": 0.15})


def _background_colour(kind: str, rng: np.random.Generator, garment: np.ndarray) -> np.ndarray:
    """The backdrop colour, chosen to stay clear of the garment colour where it can."""
    if kind in ("white", "grey_gradient"):
        level = rng.uniform(246, 255) if kind == "white" else rng.uniform(222, 240)
        return np.full(3, level, np.float32)
    if kind == "light_grey":
        return np.full(3, rng.uniform(232, 244), np.float32)
    if kind == "cream":
        return np.array([248, 243, 230], np.float32) * rng.uniform(0.97, 1.0)
    palette = _PASTELS if kind == "pastel" else _BACKDROPS
    order = rng.permutation(len(palette))
    for i in order:
        colour = _vary(rng, palette[int(i)], 0.03)
        if np.linalg.norm(colour - garment) > 110:
            return colour
    return np.full(3, 250.0, np.float32)


def _background_gain(kind: str, rng: np.random.Generator, lw: int, lh: int) -> np.ndarray:
    """Studio lighting over a reduced canvas: gentle vignette, or a wall-to-floor grey sweep."""
    v = np.linspace(0.0, 1.0, lh, dtype=np.float32)[:, None]
    u = np.linspace(-1.0, 1.0, lw, dtype=np.float32)[None, :]
    cx, cy = rng.uniform(-0.2, 0.2), rng.uniform(0.3, 0.5)
    radial = (u - cx) ** 2 + ((v - cy) * 2.0) ** 2
    if kind == "grey_gradient":
        return (1.04 - rng.uniform(0.08, 0.16) * v - rng.uniform(0.02, 0.06) * radial).astype(np.float32)
    if kind in ("white", "cream"):
        return np.clip(1.02 - rng.uniform(0.0, 0.025) * radial, 0, 1).astype(np.float32)
    return (1.0 - rng.uniform(0.02, 0.08) * radial - rng.uniform(0.0, 0.05) * v).astype(np.float32)


def _shadow(rng: np.random.Generator, alpha: np.ndarray, box: tuple[int, int, int, int], lw: int, lh: int,
            f: float, light: bool) -> np.ndarray:
    """Shadow darkness (0..1) over the reduced canvas: a soft drop shadow and a floor shadow."""
    x0, y0, x1, y1 = box
    out = np.zeros((lh, lw), np.float32)
    bx0, by0 = int(x0 / f), int(y0 / f)
    bw = max(1, min(lw - bx0, int(round((x1 - x0) / f))))
    bh = max(1, min(lh - by0, int(round((y1 - y0) / f))))
    small = cv2.resize(alpha, (bw, bh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    span = max(lw, lh)
    dx, dy = int(round(span * rng.uniform(-0.006, 0.012))), int(round(span * rng.uniform(0.004, 0.014)))
    sx0, sy0 = bx0 + dx, by0 + dy
    cx0, cy0 = max(0, sx0), max(0, sy0)
    cx1, cy1 = min(lw, sx0 + bw), min(lh, sy0 + bh)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0:cy1, cx0:cx1] = small[cy0 - sy0:cy1 - sy0, cx0 - sx0:cx1 - sx0]
    strength = rng.uniform(0.14, 0.26) if light else rng.uniform(0.08, 0.22)
    out = cv2.GaussianBlur(out, (0, 0), max(0.8, span * rng.uniform(0.006, 0.016))) * strength
    if rng.random() < 0.6:
        floor = np.zeros((lh, lw), np.float32)
        centre = (int(round((x0 + x1) / 2 / f)), int(round(min(lh - 2, y1 / f + span * 0.004))))
        axes = (max(1, int((x1 - x0) / f * rng.uniform(0.35, 0.5))),
                max(1, int(span * rng.uniform(0.01, 0.025))))
        cv2.ellipse(floor, centre, axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA)
        floor = cv2.GaussianBlur(floor, (0, 0), max(0.8, span * 0.015)) * rng.uniform(0.15, 0.3)
        out = np.maximum(out, floor)
    return np.clip(out, 0.0, 0.6)


def _backdrop(kind: str, colour: np.ndarray, rng: np.random.Generator, alpha: np.ndarray,
              box: tuple[int, int, int, int], width: int, height: int, light: bool) -> np.ndarray:
    """The lit, shadowed studio background (HxWx3 uint8) for a product covering ``alpha`` in ``box``."""
    f = max(1.0, max(width, height) / 200)
    lw, lh = max(2, math.ceil(width / f)), max(2, math.ceil(height / f))
    gain = _background_gain(kind, rng, lw, lh) * (1.0 - _shadow(rng, alpha, box, lw, lh, f, light))
    gain = cv2.resize(gain, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.merge([cv2.convertScaleAbs(gain, alpha=float(c)) for c in colour])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def product_type_for(index: int, seed: int) -> str:
    """The product type of item ``index`` in the catalogue of ``seed``.

    A golden-ratio sequence walks through the type weights, so any run of a few dozen items
    holds every type in about its catalogue share (rare types rarer) without being periodic.
    """
    offset = (seed * 0.7548776662466927) % 1.0
    u = (offset + index * _GOLDEN) % 1.0
    cumulative = np.cumsum([TYPE_WEIGHTS[t] for t in PRODUCT_TYPES])
    cumulative /= cumulative[-1]
    return PRODUCT_TYPES[int(min(np.searchsorted(cumulative, u, side="right"), len(PRODUCT_TYPES) - 1))]


def stem_for(index: int, seed: int) -> str:
    """The file stem of item ``index``: ``sku-<seed>-<index:05d>``."""
    return f"sku-{seed}-{index:05d}"


def pick_size(rng: np.random.Generator, max_side: int, long_side: int | None = None) -> tuple[int, int]:
    """A catalogue canvas size ``(width, height)``, scaled down so the long side <= ``max_side``,
    or scaled so that it is exactly ``long_side`` when given."""
    weights = np.array([w for w, _ in _SIZE_FAMILIES])
    family = _SIZE_FAMILIES[int(rng.choice(len(weights), p=weights / weights.sum()))][1]
    width, height = family[int(rng.integers(len(family)))]
    factor = long_side / max(width, height) if long_side else min(1.0, max_side / max(width, height))
    return max(16, int(round(width * factor))), max(16, int(round(height * factor)))


def render_item(index: int, config: SynthConfig) -> SynthItem:
    """Render product ``index`` of the catalogue described by ``config``.

    Takes the item index and the config (seed, ``max_side``); returns a ``SynthItem`` with an
    RGB image (HxWx3 uint8), its exact mask (HxW uint8, 0 or 255, same geometry and size) and
    its labels. The same index and config always give identical arrays.
    """
    rng = np.random.default_rng([config.seed, index])
    product_type = product_type_for(index, config.seed)
    light = product_type == "light_coloured"
    width, height = pick_size(rng, config.max_side, config.long_side)
    shape = _shape_for(product_type, rng)
    matrix, scale = _place(shape, rng, width, height)
    box = _box(shape, matrix, width, height)
    x0, y0, x1, y1 = box
    alpha = _coverage(shape, matrix, scale, box)
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = cv2.threshold(alpha, 127, 255, cv2.THRESH_BINARY)[1]

    pattern = _pattern_kind(rng, product_type, shape.style)
    garment = _garment_colour(rng, product_type, shape.style, pattern)
    kind = _background_kind(rng, light)
    backdrop = _backdrop(kind, _background_colour(kind, rng, garment), rng, alpha, box, width, height, light)

    fabric, weave = _pattern(pattern, rng, y1 - y0, x1 - x0, scale, garment, light)
    shade = _shading(shape, rng, matrix, scale, box, alpha, light)
    shade *= 1.0 - _details(shape, matrix, scale, box, rng).astype(np.float32) * np.float32(1 / 255)
    shade *= _grain(rng, y1 - y0, x1 - x0, 0.008 if light else 0.02)
    if weave is not None:
        shade *= weave
    texture = _colourise(fabric, shade)
    _hardware(texture, shape, matrix, scale, np.array([x0, y0], dtype=np.float64), rng, pattern)

    weight = alpha.astype(np.float32) / 255.0
    image = backdrop
    image[y0:y1, x0:x1] = cv2.blendLinear(texture, backdrop[y0:y1, x0:x1], weight, 1.0 - weight)
    return SynthItem(stem=stem_for(index, config.seed), product_type=product_type, image=image,
                     mask=mask, background=kind, pattern=pattern, style=shape.style)


def _truth_csv(rows: list[dict]) -> str:
    """Render the truth rows as CSV text with ``TRUTH_COLUMNS``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(TRUTH_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in TRUTH_COLUMNS})
    return out.getvalue()


def _good_row(item: SynthItem) -> dict:
    """The truth row of a rendered product."""
    height, width = item.mask.shape
    return {"stem": item.stem, "product_type": item.product_type, "width": width, "height": height,
            "background": item.background, "pattern": item.pattern, "expected_reason": ""}


def generate_catalogue(batch_url: str, config: SynthConfig, storage_options: dict | None = None,
                       progress: bool = False) -> dict:
    """Write a synthetic studio drop under ``batch_url`` (``s3://...`` or a local folder).

    Writes ``images/<stem>.jpg`` and ``masks/<stem>.png`` for ``config.n`` products, then
    ``config.bad`` bad inputs (``tasks.dev.badinputs.write_bad_inputs``), then ``truth.csv``, and
    last the empty ``_READY`` marker. Returns ``{"batch_url", "n_good", "n_bad", "per_type"}``.
    """
    storage.ensure_bucket(batch_url, storage_options)
    rows: list[dict] = []
    per_type = {t: 0 for t in PRODUCT_TYPES}
    for index in tqdm(range(config.n), desc="synth", unit="img", disable=not progress):
        item = render_item(index, config)
        storage.write_bytes(storage.join(batch_url, "images", f"{item.stem}.jpg"),
                            encode_jpeg(item.image, config.jpeg_quality), storage_options)
        storage.write_bytes(storage.join(batch_url, "masks", f"{item.stem}.png"),
                            encode_png(item.mask), storage_options)
        rows.append(_good_row(item))
        per_type[item.product_type] += 1
    bad_rows: list[dict] = []
    if config.bad > 0:
        from tasks.dev.badinputs import write_bad_inputs

        bad_rows = write_bad_inputs(batch_url, config.bad, config.seed, storage_options)
        rows.extend({"stem": r["stem"], "expected_reason": r["expected_reason"]} for r in bad_rows)
    storage.write_text(layout.batch_truth(batch_url), _truth_csv(rows), storage_options)
    storage.write_text(layout.ready_marker(batch_url), "", storage_options)
    return {"batch_url": batch_url, "n_good": config.n, "n_bad": len(bad_rows), "per_type": per_type}
