"""Augmentation: more training pairs for rare product clusters, image and mask always together.

The ops are small pure functions ``op(image, mask, rng, ...) -> (image, mask)`` on an RGB uint8
image (HxWx3) and its mask (HxW uint8, 0 or 255); none of them edits its inputs:

* :func:`random_crop_keep_product` - a random crop that keeps the product's box (plus a margin);
* :func:`flip` - horizontal mirror;
* :func:`side_by_side` - two products next to each other at a common height; mask = union;
* :func:`place_on_background` - a product on another photo's background (its product inpainted);
* :func:`replace_background` - a new studio background (plain, gradients, paper, vignette,
  seamless floor with a contact shadow) behind the product, with a 1-2 px feathered, decontaminated
  edge: pixels more than 2 px outside the mask are exactly the new background, pixels more than
  2 px inside are exactly the original;
* :func:`photometric_jitter` - small brightness / contrast / saturation / hue changes to the image.

The stage functions work on a dataset version: :func:`plan_augmentation` says how many samples
each cluster needs so that its **train** split reaches ``target_per_cluster`` (rare clusters get
more, none goes beyond), :func:`augment_cluster` (mapped over clusters by the DAG) writes them
under ``<dataset>/augmented/``, and :func:`finalize_augmentation` merges the per-cluster tables
into ``augmented/manifest.parquet`` and draws ``augmented/gallery.jpg``. Sample ``i`` of a cluster
is drawn from ``np.random.default_rng([seed, hash(cluster), i])``, so a re-run writes the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pandas as pd

from tasks.core import layout, storage
from tasks.core.alpha import decontaminated_foreground
from tasks.core.codecs import decode_pair, encode_jpeg, encode_png
from tasks.core.manifest import STATUS_OK, audit_excluded, read_table, write_table
from tasks.data.cleaning import safe_stem
from tasks.data.config import AugmentConfig

log = logging.getLogger(__name__)

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "linear", "radial", "paper", "vignette", "floor")
#: Columns of ``augmented/parts/<cluster>.parquet`` and ``augmented/manifest.parquet``.
AUGMENTED_COLUMNS: tuple[str, ...] = (
    "stem", "key", "source_keys", "cluster", "split", "ops", "image_url", "mask_url", "width", "height",
)
_INT_COLUMNS = ("width", "height")
_GALLERY_SIZE = 24
_OUTLINE = (255, 0, 255)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _binary(mask: np.ndarray) -> np.ndarray:
    """A mask as bool (foreground where >= 128)."""
    return mask >= 128


def product_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The product's bounding box ``(x0, y0, x1, y1)`` (end-exclusive), or None for an empty mask."""
    ys, xs = np.nonzero(_binary(mask))
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize a pair to ``size = (width, height)``.

    The image uses area interpolation when shrinking and linear when enlarging; the mask is resized
    as coverage and re-thresholded at one half (as cleaning does), so edges stay in place.
    Returns ``(image, mask)`` with the mask in {0, 255}.
    """
    width, height = size
    if (width, height) == (image.shape[1], image.shape[0]):
        return image.copy(), np.where(_binary(mask), 255, 0).astype(np.uint8)
    shrinking = width * height < image.shape[0] * image.shape[1]
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    coverage = cv2.resize(_binary(mask).astype(np.float32), (width, height),
                          interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return out, np.where(coverage >= 0.5, 255, 0).astype(np.uint8)


def fit_longer_side(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a pair so that its longer side is ``size`` pixels, keeping the aspect ratio."""
    height, width = mask.shape
    scale = size / max(width, height)
    return resize_pair(image, mask, (max(1, round(width * scale)), max(1, round(height * scale))))


# --------------------------------------------------------------------------------------------
# Geometric ops
# --------------------------------------------------------------------------------------------

def random_crop_keep_product(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, margin: float = 0.04, min_scale: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a random window (same aspect ratio) that keeps the product's box and a margin inside.

    Takes the pair, the generator, the margin as a share of the longer side (at least 2 px) and the
    smallest window as a share of the image side. Returns the cropped ``(image, mask)``; a pair
    whose product (plus margin) fills the frame, or an empty mask, comes back uncropped.
    """
    height, width = mask.shape
    box = product_box(mask)
    if box is None:
        return image.copy(), mask.copy()
    pad = max(2, round(margin * max(width, height)))
    bx0, by0 = max(0, box[0] - pad), max(0, box[1] - pad)
    bx1, by1 = min(width, box[2] + pad), min(height, box[3] + pad)
    need = max((bx1 - bx0) / width, (by1 - by0) / height, min_scale)
    scale = float(rng.uniform(need, 1.0)) if need < 1.0 else 1.0
    cw = min(width, max(bx1 - bx0, round(scale * width)))
    ch = min(height, max(by1 - by0, round(scale * height)))
    x0 = int(rng.integers(max(0, bx1 - cw), min(bx0, width - cw) + 1))
    y0 = int(rng.integers(max(0, by1 - ch), min(by0, height - ch) + 1))
    return image[y0:y0 + ch, x0:x0 + cw].copy(), mask[y0:y0 + ch, x0:x0 + cw].copy()


def flip(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mirror the pair left-right (``rng`` is unused; it keeps the ops' common signature)."""
    return image[:, ::-1].copy(), mask[:, ::-1].copy()


def _product_strip(image: np.ndarray, mask: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """The full-height columns around the product (plus ``margin`` of the width on each side)."""
    box = product_box(mask)
    if box is None:
        return image, mask
    pad = max(2, round(margin * mask.shape[1]))
    x0, x1 = max(0, box[0] - pad), min(mask.shape[1], box[2] + pad)
    return image[:, x0:x1], mask[:, x0:x1]


def side_by_side(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    other_image: np.ndarray,
    other_mask: np.ndarray,
    margin: float = 0.06,
) -> tuple[np.ndarray, np.ndarray]:
    """Put two products next to each other on one canvas.

    Each pair is cut to the columns around its product (plus ``margin`` of its width), both are
    resized to the smaller of their two heights, and the generator picks which one is on the left.
    Returns ``(image, mask)``; the mask is the union of the two placed masks. The two halves keep
    their own studio backgrounds, so the pipeline follows this op with :func:`replace_background`.
    """
    strips = [_product_strip(image, mask, margin), _product_strip(other_image, other_mask, margin)]
    height = min(s[1].shape[0] for s in strips)
    placed = [resize_pair(img, m, (max(1, round(m.shape[1] * height / m.shape[0])), height)) for img, m in strips]
    if rng.random() < 0.5:
        placed.reverse()
    return np.hstack([p[0] for p in placed]), np.hstack([p[1] for p in placed])


def remove_product(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo's background with its product painted out (``cv2.inpaint`` at quarter size).

    Returns an RGB image of the same size; pixels away from the (dilated) product are unchanged.
    """
    height, width = mask.shape
    hole = cv2.dilate(_binary(mask).astype(np.uint8), np.ones((7, 7), np.uint8))
    if not hole.any():
        return image.copy()
    factor = 4 if min(height, width) >= 64 else 1
    small = cv2.resize(image, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA)
    small_hole = cv2.resize(hole, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_AREA)
    small_hole = cv2.dilate((small_hole > 0).astype(np.uint8), np.ones((3, 3), np.uint8))
    filled = cv2.inpaint(small, small_hole, 3, cv2.INPAINT_TELEA)
    filled = cv2.resize(filled, (width, height), interpolation=cv2.INTER_CUBIC)
    weight = cv2.GaussianBlur(cv2.dilate(hole, np.ones((5, 5), np.uint8)).astype(np.float32), (0, 0), 2.0)
    weight = np.maximum(weight, hole.astype(np.float32))[..., None]
    return np.clip(filled * weight + image * (1.0 - weight) + 0.5, 0, 255).astype(np.uint8)


def place_on_background(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    other_image: np.ndarray,
    other_mask: np.ndarray,
    scale_range: tuple[float, float] = (0.6, 0.95),
    feather: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Place this pair's product onto another photo's background.

    The other photo's product is painted out (:func:`remove_product`); this product is cut to its
    box, scaled to ``scale_range`` of the largest size that fits, put at a random position and
    composited with a feathered edge (:func:`composite`). Returns ``(image, mask)`` at the other
    photo's size; the mask is the placed product's mask.
    """
    plate = remove_product(other_image, other_mask)
    height, width = other_mask.shape
    box = product_box(mask)
    if box is None:
        return plate, np.zeros((height, width), np.uint8)
    crop_img, crop_mask = image[box[1]:box[3], box[0]:box[2]], mask[box[1]:box[3], box[0]:box[2]]
    fit = min(width / crop_mask.shape[1], height / crop_mask.shape[0])
    scale = fit * float(rng.uniform(*scale_range))
    size = (max(1, min(width, round(crop_mask.shape[1] * scale))),
            max(1, min(height, round(crop_mask.shape[0] * scale))))
    prod_img, prod_mask = resize_pair(crop_img, crop_mask, size)
    x0 = int(rng.integers(0, width - size[0] + 1))
    y0 = int(rng.integers(0, height - size[1] + 1))
    canvas = np.zeros_like(plate)
    placed = np.zeros((height, width), np.uint8)
    canvas[y0:y0 + size[1], x0:x0 + size[0]] = prod_img
    placed[y0:y0 + size[1], x0:x0 + size[0]] = prod_mask
    edge = float(rng.uniform(1.0, 2.0)) if feather is None else feather
    return composite(canvas, placed, plate, edge), placed


# --------------------------------------------------------------------------------------------
# Backgrounds and compositing
# --------------------------------------------------------------------------------------------

def _studio_colour(rng: np.random.Generator) -> np.ndarray:
    """A backdrop colour (float32 RGB 0..255): white, grey, pastel, muted colour or dark."""
    family = rng.choice(["white", "grey", "pastel", "colour", "dark"], p=[0.3, 0.2, 0.25, 0.15, 0.1])
    if family == "white":
        return np.full(3, rng.uniform(238, 255), np.float32) - np.array([0, 0, rng.uniform(0, 6)], np.float32)
    if family == "grey":
        return np.full(3, rng.uniform(150, 235), np.float32)
    if family == "dark":
        return np.full(3, rng.uniform(25, 70), np.float32)
    sat, val = (rng.uniform(0.08, 0.25), rng.uniform(0.86, 0.98)) if family == "pastel" else (
        rng.uniform(0.25, 0.6), rng.uniform(0.45, 0.85))
    hsv = np.array([[[rng.uniform(0, 360), sat, val]]], np.float32)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * 255.0


def _shifted(colour: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """``colour`` made lighter or darker by up to ``amount`` (a share), clipped to 0..255."""
    return np.clip(colour * float(rng.uniform(1.0 - amount, 1.0 + amount * 0.5)), 0, 255).astype(np.float32)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates ``(x, y)`` in ``[0, 1]`` as float32 HxW arrays."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    return np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width))


def _blend(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel mix ``c0 * (1 - t) + c1 * t`` (HxWx3 float32)."""
    return c0[None, None, :] * (1.0 - t[..., None]) + c1[None, None, :] * t[..., None]


def _radius(height: int, width: int, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Distance from a centre near the middle, 1 at the farthest corner (HxW float32)."""
    x, y = _grid(height, width)
    cx, cy = 0.5 + rng.uniform(-spread, spread), 0.45 + rng.uniform(-spread, spread)
    aspect = width / max(height, 1)
    r = np.sqrt(((x - cx) * aspect) ** 2 + (y - cy) ** 2)
    return r / max(float(r.max()), 1e-6)


def _noise_field(height: int, width: int, rng: np.random.Generator, cell: int) -> np.ndarray:
    """Smooth noise with features about ``cell`` px wide, zero mean, unit-ish amplitude."""
    small = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _contact_shadow(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darkening (0..1, HxW float32) of a soft elliptical shadow under the product's box."""
    height, width = mask.shape
    shadow = np.zeros((height, width), np.float32)
    box = product_box(mask)
    if box is None:
        return shadow
    x0, _, x1, y1 = box
    axes = (max(1, int((x1 - x0) * rng.uniform(0.35, 0.55))), max(1, int(height * rng.uniform(0.012, 0.03))))
    centre = ((x0 + x1) // 2, min(height - 1, y1 + int(height * 0.004)))
    cv2.ellipse(shadow, centre, axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    shadow = cv2.GaussianBlur(shadow, (0, 0), max(1.0, max(height, width) * 0.015))
    return shadow / max(float(shadow.max()), 1e-6) * float(rng.uniform(0.15, 0.35))


def studio_background(
    kind: str, height: int, width: int, rng: np.random.Generator, mask: np.ndarray | None = None
) -> np.ndarray:
    """A procedural studio background (HxWx3 uint8).

    ``kind`` is one of :data:`BACKGROUND_KINDS`: ``plain`` colour, ``linear`` or ``radial``
    gradient, ``paper`` (fine grain and mottling), ``vignette`` (soft darker corners) or ``floor``
    (a seamless wall-to-floor sweep with a contact shadow under the product of ``mask``).
    """
    colour = _studio_colour(rng)
    x, y = _grid(height, width)
    if kind == "plain":
        out = np.broadcast_to(colour, (height, width, 3)).astype(np.float32)
    elif kind == "linear":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        out = _blend(colour, _shifted(colour, rng, 0.3) if rng.random() < 0.6 else _studio_colour(rng), t)
    elif kind == "radial":
        out = _blend(colour, _shifted(colour, rng, 0.35), _radius(height, width, rng, 0.15) ** rng.uniform(1.0, 2.0))
    elif kind == "paper":
        grain = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 0.6)
        mottle = _noise_field(height, width, rng, max(8, max(height, width) // 10))
        gain = 1.0 + grain * rng.uniform(0.015, 0.035) + mottle * rng.uniform(0.008, 0.02)
        out = colour[None, None, :] * gain[..., None]
    elif kind == "vignette":
        gain = 1.0 - rng.uniform(0.12, 0.35) * _radius(height, width, rng, 0.08) ** 2
        out = colour[None, None, :] * gain[..., None]
    elif kind == "floor":
        box = product_box(mask) if mask is not None else None
        horizon = (box[3] / height if box else 0.8) - rng.uniform(0.05, 0.25)
        t = 1.0 / (1.0 + np.exp(-(y - horizon) / rng.uniform(0.04, 0.1)))
        out = _blend(colour, _shifted(colour, rng, 0.15), t) * (1.02 - 0.06 * (1 - y))[..., None]
        if mask is not None:
            out *= (1.0 - _contact_shadow(mask, rng))[..., None]
    else:
        raise ValueError(f"unknown background kind {kind!r}; kinds are {BACKGROUND_KINDS}")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def feather_alpha(mask: np.ndarray, feather: float = 1.5) -> np.ndarray:
    """Soft alpha (HxW float32, 0..1) from a binary mask, ramping over ``feather`` px at the edge.

    The ramp is centred on the mask boundary (alpha 0.5 there), from the signed distance to it,
    smoothed over 3x3 px so a pixel staircase becomes a smooth edge. With ``feather`` <= 2 every
    pixel of the mask eroded by 2 px (5x5) has alpha exactly 1 (its 3x3 neighbours are at least
    2 px inside, signed distance >= 1.5) and every pixel outside the mask dilated by 2 px has
    alpha exactly 0.
    """
    if not 0 < feather <= 2.0:
        raise ValueError(f"feather must be in (0, 2] px, got {feather}")
    fg = _binary(mask).astype(np.uint8)
    inside = cv2.distanceTransform(fg, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - fg, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    signed = cv2.GaussianBlur(np.where(fg > 0, inside - 0.5, 0.5 - outside).astype(np.float32), (3, 3), 0.7)
    return np.clip(0.5 + signed / feather, 0.0, 1.0).astype(np.float32)


def composite(image: np.ndarray, mask: np.ndarray, background: np.ndarray, feather: float = 1.5) -> np.ndarray:
    """Put the masked product of ``image`` over ``background`` (same size) with a soft edge.

    Returns an RGB uint8 image: exactly ``image`` where alpha is 1, exactly ``background`` where
    alpha is 0 (see :func:`feather_alpha`), and the decontaminated foreground blended over the
    background in the band between.
    """
    if background.shape != image.shape or mask.shape != image.shape[:2]:
        raise ValueError(f"shapes differ: image {image.shape}, mask {mask.shape}, background {background.shape}")
    alpha = feather_alpha(mask, feather)
    fg = decontaminated_foreground(image, alpha)
    a = alpha[..., None]
    blended = np.clip(fg.astype(np.float32) * a + background.astype(np.float32) * (1.0 - a) + 0.5, 0, 255)
    out = np.where(a >= 1.0, image, np.where(a <= 0.0, background, blended.astype(np.uint8)))
    return out.astype(np.uint8)


def replace_background(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    kind: str | None = None,
    feather: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace everything outside the product with a new studio background.

    Takes the pair, the generator, optionally the background kind (else drawn from
    :data:`BACKGROUND_KINDS`) and the edge width in px (else drawn from 1..2). The background is
    drawn first (``studio_background(kind, h, w, rng, mask)``), then the feather. Returns
    ``(image, mask)``; the mask is unchanged.
    """
    height, width = mask.shape
    if kind is None:
        kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    background = studio_background(kind, height, width, rng, mask)
    edge = float(rng.uniform(1.0, 2.0)) if feather is None else feather
    return composite(image, mask, background, edge), mask.copy()


def photometric_jitter(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.08,
    contrast: float = 0.1,
    saturation: float = 0.15,
    hue_degrees: float = 6.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Small random changes of brightness, contrast, saturation and hue to the image only.

    Each amount is the largest change either way (shares, or degrees for the hue). Returns
    ``(image, mask)``; the mask is an unchanged copy.
    """
    rgb = image.astype(np.float32) / 255.0
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue_degrees, hue_degrees)) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - saturation, 1 + saturation), 0.0, 1.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    mean = float(rgb.mean())
    rgb = (rgb - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    rgb = rgb * rng.uniform(1 - brightness, 1 + brightness)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), mask.copy()


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------

def cluster_seed(cluster: str) -> int:
    """A stable 32-bit number for a cluster name (``sha256``, not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(cluster.encode("utf-8")).digest()[:4], "big")


def sample_rng(seed: int, cluster: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``cluster``: ``default_rng([seed, cluster_seed, index])``."""
    return np.random.default_rng([seed, cluster_seed(cluster), index])


def draw_recipe(rng: np.random.Generator, config: AugmentConfig) -> list[str]:
    """The op names of one sample, in the order they run.

    Geometry first (``crop``, ``flip``, then at most one of ``side_by_side`` / ``place``), then the
    look (``background``, ``jitter``). ``side_by_side`` is always followed by ``background`` (its
    halves have two studio backgrounds); ``place`` brings its own background.
    """
    r = rng.random()
    pair_op = None
    if r < config.p_side_by_side:
        pair_op = "side_by_side"
    elif r < config.p_side_by_side + config.p_place:
        pair_op = "place"
    ops = [name for name, p in (("crop", config.p_crop), ("flip", config.p_flip)) if rng.random() < p]
    if pair_op:
        ops.append(pair_op)
    wants_background = rng.random() < config.p_background
    if pair_op == "side_by_side" or (pair_op is None and wants_background):
        ops.append("background")
    if rng.random() < config.p_jitter:
        ops.append("jitter")
    return ops or ["background"]


def make_sample(
    primary: tuple[np.ndarray, np.ndarray],
    secondary: tuple[np.ndarray, np.ndarray] | None,
    ops: list[str],
    rng: np.random.Generator,
    working_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``ops`` (from :func:`draw_recipe`) on ``primary``; ``secondary`` feeds the two-pair ops.

    Raises ``ValueError`` when a two-pair op is asked for without a ``secondary`` pair.

    The geometry ops run first, the pair is then fitted to the primary's own longer side, at most
    ``working_size`` (a crop is zoomed back to it; a photo cleaning kept below the working size is not
    enlarged), and the look ops run at that final size so edges are composited at output
    resolution. Returns ``(image, mask)``.
    """
    if secondary is None and ("side_by_side" in ops or "place" in ops):
        raise ValueError(f"ops {ops} need a second pair")
    image, mask = primary
    size = min(working_size, max(mask.shape[:2]))
    for op in ops:
        if op == "crop":
            image, mask = random_crop_keep_product(image, mask, rng)
        elif op == "flip":
            image, mask = flip(image, mask, rng)
        elif op == "side_by_side":
            image, mask = side_by_side(image, mask, rng, *secondary)
        elif op == "place":
            other = fit_longer_side(*secondary, size)
            image, mask = place_on_background(image, mask, rng, *other)
    image, mask = fit_longer_side(image, mask, size)
    for op in ops:
        if op == "background":
            image, mask = replace_background(image, mask, rng)
        elif op == "jitter":
            image, mask = photometric_jitter(image, mask, rng)
    return image, mask


# --------------------------------------------------------------------------------------------
# Stage functions
# --------------------------------------------------------------------------------------------

def plan_augmentation(manifest: pd.DataFrame, config: AugmentConfig) -> dict[str, int]:
    """How many augmented samples each cluster needs.

    Takes a manifest with ``status``, ``cluster`` and ``split``; only clean ``train`` rows count.
    Returns ``{cluster: n}`` (sorted by cluster) with ``n = target_per_cluster - train size`` for a
    cluster below the target and 0 for one at or above it, so rare clusters get the most and none
    goes beyond the target.
    """
    missing = {"status", "cluster", "split"} - set(manifest.columns)
    if missing:
        raise ValueError(f"manifest lacks {sorted(missing)}: run the review and split stages first")
    usable = (manifest["status"] == STATUS_OK) & ~audit_excluded(manifest)
    train = manifest[usable & (manifest["split"] == "train") & manifest["cluster"].notna()]
    sizes = Counter(train["cluster"].astype(str))
    return {cluster: max(0, config.target_per_cluster - sizes[cluster]) for cluster in sorted(sizes)}


def _decode_pair(image_bytes: bytes, mask_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode a clean pair: RGB uint8 image and a {0, 255} mask of the same size."""
    try:
        rgb, grey = decode_pair(image_bytes, mask_bytes)
    except ValueError:
        raise ValueError("could not decode a clean pair") from None
    if grey.shape != rgb.shape[:2]:
        raise ValueError(f"clean pair sizes differ: image {rgb.shape[:2]}, mask {grey.shape}")
    return rgb, np.where(grey >= 128, 255, 0).astype(np.uint8)


class _PairCache:
    """Decoded source pairs by row index, read on first use (thread-safe, bounded)."""

    def __init__(self, rows: pd.DataFrame, storage_options: dict | None, capacity: int = 256) -> None:
        self.rows, self.options, self.capacity = rows, storage_options, capacity
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded pair of row ``index``."""
        with self.lock:
            if index in self.cache:
                self.cache.move_to_end(index)
                return self.cache[index]
        row = self.rows.iloc[index]
        pair = _decode_pair(storage.read_bytes(row["image_url"], self.options),
                            storage.read_bytes(row["mask_url"], self.options))
        with self.lock:
            self.cache[index] = pair
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return pair


def _working_size(manifest: pd.DataFrame, config: AugmentConfig) -> int:
    """The largest longer side of the outputs: the config's, or the longest among the clean pairs
    (the cleaning's working size whenever a photo reached it: cleaning shrinks larger photos to it
    and never enlarges smaller ones; :func:`make_sample` keeps each sample at most its primary's size)."""
    if config.working_size is not None:
        return config.working_size
    ok = manifest[manifest["status"] == STATUS_OK]
    sides = np.maximum(ok["width"].astype("int64"), ok["height"].astype("int64"))
    return int(sides.max())


def augmented_urls(dataset_url: str, key: str) -> tuple[str, str]:
    """URLs of an augmented pair: ``(augmented/images/<key>.jpg, augmented/masks/<key>.png)``."""
    return (storage.join(layout.augmented(dataset_url), "images", f"{key}.jpg"),
            storage.join(layout.augmented(dataset_url), "masks", f"{key}.png"))


def part_url(dataset_url: str, cluster: str) -> str:
    """URL of a cluster's table of augmented samples: ``augmented/parts/<cluster>.parquet``."""
    return storage.join(layout.augmented(dataset_url), "parts", f"{safe_stem(cluster)}.parquet")


def _augmented_frame(rows: list[dict]) -> pd.DataFrame:
    """A table with exactly :data:`AUGMENTED_COLUMNS` and stable dtypes."""
    frame = pd.DataFrame(rows, columns=list(AUGMENTED_COLUMNS))
    for col in AUGMENTED_COLUMNS:
        frame[col] = frame[col].astype("Int64" if col in _INT_COLUMNS else "string")
    return frame


def _one_sample(index: int, sources: pd.DataFrame, order: np.ndarray, pairs: _PairCache, cluster: str,
                config: AugmentConfig, size: int, dataset_url: str, storage_options: dict | None) -> dict:
    """Generate, encode and write augmented sample ``index`` of ``cluster``; returns its table row."""
    rng = sample_rng(config.seed, cluster, index)
    first = int(order[index % len(order)])
    second = first if len(order) == 1 else (first + 1 + int(rng.integers(len(order) - 1))) % len(order)
    ops = draw_recipe(rng, config)
    two = "side_by_side" in ops or "place" in ops
    image, mask = make_sample(pairs.get(first), pairs.get(second) if two else None, ops, rng, size)
    key = f"aug-{safe_stem(cluster)}-{config.seed}-{index:05d}"
    image_url, mask_url = augmented_urls(dataset_url, key)
    storage.write_bytes(image_url, encode_jpeg(image, config.jpeg_quality), storage_options)
    storage.write_bytes(mask_url, encode_png(mask), storage_options)
    source_keys = [sources.iloc[first]["key"]] + ([sources.iloc[second]["key"]] if two else [])
    return {"stem": key, "key": key, "source_keys": ",".join(source_keys), "cluster": cluster, "split": "train",
            "ops": ",".join(ops), "image_url": image_url, "mask_url": mask_url,
            "width": int(mask.shape[1]), "height": int(mask.shape[0])}


def augment_cluster(
    dataset_url: str,
    cluster: str,
    n: int,
    config: AugmentConfig,
    storage_options: dict | None = None,
    io_threads: int = 4,
) -> dict:
    """Generate ``n`` augmented train samples of one cluster and write them with their table.

    Takes the dataset URL (its ``manifest.parquet`` must have ``cluster`` and ``split``), the cluster
    name, the number of samples (from :func:`plan_augmentation`), the config, and how many samples
    to make at once. Reads only the cluster's clean train pairs; writes
    ``augmented/images/<key>.jpg``, ``augmented/masks/<key>.png`` and ``augmented/parts/<cluster>.parquet``
    (written even when ``n`` is 0, so a re-run replaces a stale table). Returns
    ``{"cluster", "n", "part_url"}``. Raises ``ValueError`` when ``n`` > 0 and the cluster has no
    train pair.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    manifest = read_table(layout.manifest(dataset_url), storage_options)
    ok = (manifest["status"] == STATUS_OK) & ~audit_excluded(manifest)  # never augment a broken mask
    train = manifest[ok & (manifest["split"] == "train") & (manifest["cluster"] == cluster)]
    sources = train.sort_values("stem", kind="stable").reset_index(drop=True)
    if n and not len(sources):
        raise ValueError(f"cluster {cluster!r} has no clean train pairs to augment")
    rows: list[dict] = []
    if n:
        size = _working_size(manifest, config)
        order = np.random.default_rng([config.seed, cluster_seed(cluster)]).permutation(len(sources))
        pairs = _PairCache(sources, storage_options)
        with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
            rows = list(pool.map(
                lambda i: _one_sample(i, sources, order, pairs, cluster, config, size, dataset_url, storage_options),
                range(n),
            ))
    url = write_table(_augmented_frame(rows), part_url(dataset_url, cluster), storage_options)
    log.info("cluster %s: %d augmented samples from %d train pairs", cluster, n, len(sources))
    return {"cluster": cluster, "n": n, "part_url": url}


def _gallery_rows(manifest: pd.DataFrame, count: int) -> pd.DataFrame:
    """Up to ``count`` samples, taken round-robin over clusters and spread within each."""
    picked: list[int] = []
    groups = [g.index.to_numpy() for _, g in manifest.groupby("cluster", sort=True)]
    per = [np.linspace(0, len(g) - 1, min(len(g), count)).round().astype(int) for g in groups]
    for round_ in range(count):
        for group, spots in zip(groups, per, strict=True):
            if round_ < len(spots) and len(picked) < count:
                picked.append(int(group[spots[round_]]))
    return manifest.loc[picked]


def _gallery_tile(image: np.ndarray, mask: np.ndarray, caption: tuple[str, str], cell: int) -> np.ndarray:
    """One gallery cell: the sample letterboxed in ``cell`` px, its mask outline, two caption lines."""
    small, small_mask = fit_longer_side(image, mask, cell - 8)
    contours, _ = cv2.findContours(small_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    small = np.ascontiguousarray(small)
    cv2.drawContours(small, contours, -1, _OUTLINE, 1)
    tile = np.full((cell + 26, cell, 3), 36, np.uint8)
    y0, x0 = (cell - small.shape[0]) // 2, (cell - small.shape[1]) // 2
    tile[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    for line, text in enumerate(caption):
        cv2.putText(tile, text[:36], (3, cell + 9 + 12 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.32,
                    (230, 230, 230), 1, cv2.LINE_AA)
    return tile


def write_gallery(manifest: pd.DataFrame, url: str, storage_options: dict | None = None,
                  count: int = _GALLERY_SIZE, columns: int = 6, cell: int = 160) -> str:
    """Write a JPEG grid of up to ``count`` augmented samples with their mask outlines to ``url``.

    Takes the augmented manifest; each cell shows one sample, its mask outline in magenta and a
    caption (cluster, then ops). Returns ``url``.
    """
    rows = _gallery_rows(manifest, count)
    tiles = []
    for row in rows.itertuples():
        image, mask = _decode_pair(storage.read_bytes(row.image_url, storage_options),
                                   storage.read_bytes(row.mask_url, storage_options))
        tiles.append(_gallery_tile(image, mask, (str(row.cluster), str(row.ops)), cell))
    blank = np.full_like(tiles[0], 20)
    tiles += [blank] * (-len(tiles) % columns)
    grid = np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
    return storage.write_bytes(url, encode_jpeg(grid, 88), storage_options)


def finalize_augmentation(dataset_url: str, part_urls: list[str], storage_options: dict | None = None) -> dict:
    """Merge the clusters' tables into ``augmented/manifest.parquet`` and draw ``augmented/gallery.jpg``.

    Takes the dataset URL and the ``part_url`` of every :func:`augment_cluster` result. Returns
    ``{"manifest_url", "gallery_url" (None when nothing was generated), "n", "per_cluster": {cluster: n}}``.
    """
    frames = [read_table(url, storage_options) for url in part_urls]
    frames = [f for f in frames if len(f)]
    merged = pd.concat(frames, ignore_index=True) if frames else _augmented_frame([])
    merged = _augmented_frame(merged.sort_values(["cluster", "stem"], kind="stable").to_dict("records"))
    manifest_url = write_table(merged, layout.manifest(layout.augmented(dataset_url)), storage_options)
    gallery_url = None
    if len(merged):
        gallery_url = write_gallery(merged, storage.join(layout.augmented(dataset_url), "gallery.jpg"), storage_options)
    per_cluster = {str(k): int(v) for k, v in sorted(Counter(merged["cluster"].astype(str)).items())}
    return {"manifest_url": manifest_url, "gallery_url": gallery_url, "n": int(len(merged)), "per_cluster": per_cluster}
