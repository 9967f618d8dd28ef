"""Plausibility audit of (photo, binary mask) training pairs.

Some training masks are broken: speckled, hollow, in pieces, missing the light parts of a pale
garment, or simply not where the product is. They mislead training and evaluation, so
:func:`audit_pair` measures a few features of a pair and names what looks wrong with reason codes
(:data:`REASONS`). A flagged pair goes to a person, so every check prefers silence to a guess:

``empty``
    (almost) no foreground at all.
``speckle``
    more than ``max_specks`` specks (foreground islands or enclosed pinholes smaller than
    ``speck_area``) *and* an outline rougher than ``min_speckle_roughness``: the mark of a noisy
    threshold. Pinholes in fine stripes or a print, on an otherwise smooth mask, are not enough.
``ragged``
    the outline is ragged: a 5×5 opening followed by a closing changes more than ``max_roughness``
    of the foreground in small pieces (jags and notches of at most ``max_jag_area`` pixels; a thin
    strap or a belt that the opening removes whole is one large piece and does not count) (hand-drawn masks, even of people with fingers and hair, stay well below).
``fragments``
    more than ``max_fragment_share`` of the foreground lies in pieces apart from the main
    component(s). Components at least ``main_component_ratio`` of the largest one count as main, so
    a pair of shoes is not a fragment; a bag held apart from the body is.
``holes``
    background fully enclosed by the foreground (not touching the frame) that looks like missing
    product makes up more than ``max_hole_share`` of the filled product. A hole counts when no edge
    outlines it (the mean gradient along its outline is below ``min_hole_contrast`` times the mean
    gradient inside it and in the product around it) *and* most of its pixels have a colour likelier
    in the product than in the outside background (16-level RGB histograms). Real gaps (between
    legs, arm and body, straps) are outlined by the product's edge; a white gap inside a white
    garment looks like background and is left to the model check.
``edges``
    fewer than ``min_edge_agreement`` of the outline pixels lie within ``edge_tolerance`` pixels of
    an image edge: a colour gradient above ``max(edge_relative × 90th percentile of the image's
    gradients, edge_noise_factor × median gradient of the background far from the mask,
    edge_min_gradient)``. The noise term keeps noisy or cluttered backgrounds from supporting any
    outline; the percentile term adapts to the photo's contrast, so the faint outline of a white
    garment on white still counts. Specks, pinholes and the outline along the frame are left out.
``model_disagrees``
    only with a model's probability map: the map thresholded at 0.5 overlaps the mask with IoU below
    ``min_model_iou`` although the model is confident, i.e. its own expected IoU
    ``Σ p·b / (Σ b + Σ p·(1 − b))`` (``b = p > 0.5``) is at least ``min_model_confidence``. A
    hesitant model, or one that finds nothing, never flags.

Everything is measured on a working copy whose long side is at most ``max_side`` pixels (area
interpolation; the mask is resampled and thresholded at half), so a 1000×1333 photo costs as much
as a 384×512 one, and specks smaller than a working pixel do not count: training sees the pairs at
a few hundred pixels anyway. Pixel sizes in the config are working pixels; areas are shares.

Pure NumPy/OpenCV and no project imports, so every layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np
import pandas as pd

__all__ = ["REASONS", "AuditConfig", "MaskAudit", "audit_pair", "audit_table", "summarise"]

#: Reason codes, in the order they are reported.
REASONS: tuple[str, ...] = ("empty", "speckle", "ragged", "fragments", "holes", "edges", "model_disagrees")

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
_DISC = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


@dataclass(frozen=True)
class AuditConfig:
    """Thresholds of the audit (see the module docstring). Shares are of the working image unless said."""

    #: Long side of the working copy in pixels; larger pairs are downscaled first.
    max_side: int = 512
    #: Below this foreground share of the image the mask is ``empty``.
    min_foreground: float = 0.002
    #: Islands and pinholes smaller than this share of the image are specks (10 px at 192×256).
    speck_area: float = 0.0002
    #: ``speckle``: more specks than this …
    max_specks: int = 15
    #: … and a roughness above this.
    min_speckle_roughness: float = 0.01
    #: ``ragged``: roughness (share of the foreground changed by a 5×5 opening + closing, counting
    #: only small changed pieces: jags and notches) above this.
    max_roughness: float = 0.02
    #: Changed pieces up to this many working pixels are jags; larger ones are thin parts of the
    #: product (straps, a necklace, a belt) or gaps between them, which the opening removes whole.
    max_jag_area: int = 48
    #: Non-speck components at least this share of the largest one are main components.
    main_component_ratio: float = 0.25
    #: ``fragments``: share of the foreground in non-main, non-speck components above this.
    max_fragment_share: float = 0.02
    #: ``holes``: suspect enclosed background, as a share of the filled product, above this.
    max_hole_share: float = 0.03
    #: An outline pixel is supported by an image edge within this many pixels.
    edge_tolerance: int = 2
    #: Edge threshold, relative part: this share of the image's 90th gradient percentile.
    edge_relative: float = 0.1
    #: Edge threshold, noise part: this many times the median gradient of the far background.
    edge_noise_factor: float = 2.0
    #: Edge threshold floor (Sobel magnitude on 0..255 values; a one-level step gives about 4).
    edge_min_gradient: float = 4.0
    #: ``edges``: share of supported outline pixels below this.
    min_edge_agreement: float = 0.8
    #: A hole is outlined by an edge when the mean gradient along its outline is at least this many
    #: times the mean gradient inside it and in the product band around it (texture).
    min_hole_contrast: float = 1.3
    #: ``model_disagrees``: IoU between the mask and the probability map > 0.5 below this …
    min_model_iou: float = 0.85
    #: … while the model's expected IoU is at least this.
    min_model_confidence: float = 0.8


@dataclass
class MaskAudit:
    """The measured features of one pair and what looks wrong with it (no ``reasons``: plausible).

    A feature that cannot be measured is NaN: the outline of an empty or full mask, the model check
    without a probability map.
    """

    foreground_share: float
    components: int  # non-speck foreground components
    specks: int  # tiny foreground islands + tiny enclosed pinholes
    roughness: float  # share of the foreground in small pieces changed by a 5×5 opening + closing
    fragment_share: float  # share of the foreground in non-main, non-speck components
    holes: int  # enclosed background components larger than a speck
    hole_share: float  # their area / (foreground + their area)
    suspect_hole_share: float  # the same for the holes that look like missing product
    edge_agreement: float  # share of outline pixels near an image edge
    model_iou: float = math.nan
    model_confidence: float = math.nan
    reasons: tuple[str, ...] = ()

    @property
    def flagged(self) -> bool:
        """Whether any check fired."""
        return bool(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None, ``reasons`` a list, plus ``flagged``."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and math.isnan(value):
                value = None
            out[key] = list(value) if key == "reasons" else value
        out["flagged"] = self.flagged
        return out


_FEATURES = tuple(f.name for f in fields(MaskAudit) if f.name != "reasons")


def audit_pair(image: np.ndarray, mask: np.ndarray, config: AuditConfig = AuditConfig(),
               probability: np.ndarray | None = None) -> MaskAudit:
    """Audit one pair.

    ``image``: H×W×3 uint8 (RGB; BGR gives the same result). ``mask``: H×W, bool or uint8 0/255
    (``>= 128`` is foreground). ``probability``: optional H×W float map in [0, 1], a model's
    prediction at the same size. Raises ValueError on a shape, type or range mismatch.
    """
    image, fg, probability = _working_copy(*_validated(image, mask, probability), config.max_side)
    h, w = fg.shape
    speck_px = max(1, round(config.speck_area * h * w))
    fg_u8 = fg.view(np.uint8)

    labels, areas = _components(fg_u8, connectivity=8)
    tiny = areas < speck_px
    fragment = ~tiny & (areas < config.main_component_ratio * areas[~tiny].max(initial=0))
    fg_area = max(int(areas.sum()), 1)

    bg_labels, bg_areas = _components((~fg).view(np.uint8), connectivity=4)
    nb = len(bg_areas) + 1
    enclosed = ~np.isin(np.arange(1, nb), _border(bg_labels))  # no pixel on the frame
    pinhole = enclosed & (bg_areas < speck_px)
    hole = enclosed & ~pinhole
    hole_area = int(bg_areas[hole].sum())

    clean = _without_specks(fg, labels, tiny, bg_labels, pinhole)
    magnitude = _gradient(image)
    supported = _edge_support(magnitude, clean, config)
    outline = clean & ~cv2.erode(clean.view(np.uint8), _CROSS).view(bool)  # the frame counts as inside
    smooth = cv2.morphologyEx(cv2.morphologyEx(fg_u8, cv2.MORPH_OPEN, _DISC), cv2.MORPH_CLOSE, _DISC)
    suspect = _suspect_holes(image, magnitude, fg, bg_labels, nb, hole, enclosed, config)

    audit = MaskAudit(
        foreground_share=int(np.count_nonzero(fg)) / fg.size,
        components=int(np.count_nonzero(~tiny)),
        specks=int(tiny.sum() + pinhole.sum()),
        roughness=_jagged_pixels(smooth != fg_u8, config.max_jag_area) / fg_area,
        fragment_share=int(areas[fragment].sum()) / fg_area,
        holes=int(hole.sum()),
        hole_share=hole_area / (fg_area + hole_area),
        suspect_hole_share=int(bg_areas[suspect].sum()) / (fg_area + hole_area),
        edge_agreement=float(supported[outline].mean()) if outline.any() else math.nan,
    )
    if probability is not None:
        audit.model_iou, audit.model_confidence = _model_check(probability, fg)
    audit.reasons = _reasons(audit, config)
    return audit


def audit_table(audits: Iterable[tuple[str, MaskAudit]]) -> pd.DataFrame:
    """One row per stem: the features, ``reasons`` joined by "," (empty string: none) and ``flagged``."""
    rows = [{"stem": stem, **{k: getattr(a, k) for k in _FEATURES}, "reasons": ",".join(a.reasons),
             "flagged": a.flagged} for stem, a in audits]
    return pd.DataFrame(rows, columns=["stem", *_FEATURES, "reasons", "flagged"])


def summarise(df: pd.DataFrame) -> dict[str, Any]:
    """Pairs, flagged count and share, and the count per reason code (a pair may have several)."""
    counts = dict.fromkeys(REASONS, 0)
    for joined in df["reasons"].fillna(""):
        for code in filter(None, str(joined).split(",")):
            counts[code] = counts.get(code, 0) + 1
    pairs, flagged = len(df), int(df["flagged"].sum())
    return {"pairs": pairs, "flagged": flagged, "flagged_share": flagged / pairs if pairs else 0.0,
            "reasons": counts}


def _components(binary: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, areas)`` of the connected components of a uint8 0/1 image: labels 1..n (0 is the
    rest) and the pixel count of each. Areas come from a histogram of the labels: OpenCV's
    ``connectedComponentsWithStats`` takes about four times as long, for bounding boxes not needed."""
    algorithm = cv2.CCL_BBDT if connectivity == 8 else cv2.CCL_SAUF
    n, labels = cv2.connectedComponentsWithAlgorithm(binary, connectivity, cv2.CV_32S, algorithm)
    if n == 2:  # one component (the usual product, the usual background): its area is the pixel count
        return labels, np.array([np.count_nonzero(binary)], dtype=np.intp)
    return labels, np.bincount(labels.ravel(), minlength=n)[1:]


def _border(labels: np.ndarray) -> np.ndarray:
    """The labels found on the image's frame (first and last row and column)."""
    return np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))


def _jagged_pixels(changed: np.ndarray, max_area: int) -> int:
    """Pixels of ``changed`` in 8-connected pieces of at most ``max_area`` pixels."""
    _, areas = _components(changed.view(np.uint8), connectivity=8)
    return int(areas[areas <= max_area].sum())


def _reasons(a: MaskAudit, config: AuditConfig) -> tuple[str, ...]:
    if a.foreground_share < config.min_foreground:
        checks = {"empty": True}
    else:
        checks = {
            "speckle": a.specks > config.max_specks and a.roughness > config.min_speckle_roughness,
            "ragged": a.roughness > config.max_roughness,
            "fragments": a.fragment_share > config.max_fragment_share,
            "holes": a.suspect_hole_share > config.max_hole_share,
            "edges": a.edge_agreement < config.min_edge_agreement,  # False for NaN
        }
    checks["model_disagrees"] = (a.model_confidence >= config.min_model_confidence
                                 and a.model_iou < config.min_model_iou)
    return tuple(code for code in REASONS if checks.get(code))


def _validated(image: np.ndarray, mask: np.ndarray, probability: np.ndarray | None):
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H×W×3 uint8, got shape {image.shape} and dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image's {image.shape[:2]}")
    if mask.dtype not in (np.bool_, np.uint8):
        raise ValueError(f"mask must be bool or uint8 0/255, got dtype {mask.dtype}")
    fg = mask if mask.dtype == np.bool_ else mask >= 128
    if probability is not None:
        probability = np.asarray(probability, dtype=np.float32)
        if probability.shape != mask.shape:
            raise ValueError(f"probability shape {probability.shape} does not match the mask's {mask.shape}")
        if not (np.isfinite(probability).all() and probability.min() >= 0 and probability.max() <= 1):
            raise ValueError("probability values must lie in [0, 1]")
    return image, np.ascontiguousarray(fg), probability


def _working_copy(image: np.ndarray, fg: np.ndarray, probability: np.ndarray | None, max_side: int):
    h, w = fg.shape
    if max(h, w) <= max_side:
        return image, fg, probability
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    fg = cv2.resize(fg.view(np.uint8) * np.uint8(255), size, interpolation=cv2.INTER_AREA) >= 128
    if probability is not None:
        probability = cv2.resize(probability, size, interpolation=cv2.INTER_AREA)
    return image, fg, probability


def _without_specks(fg: np.ndarray, labels: np.ndarray, tiny: np.ndarray, bg_labels: np.ndarray,
                    pinhole: np.ndarray) -> np.ndarray:
    """The foreground without its tiny components, with its pinholes filled; ``fg`` itself when there
    are neither (most masks), which saves two label look-ups over the whole image."""
    if not tiny.any() and not pinhole.any():
        return fg
    return _lookup(~tiny)[labels] | _lookup(pinhole)[bg_labels]


def _lookup(per_component: np.ndarray) -> np.ndarray:
    """A label → bool table from per-component flags (label 0, the other side, is False)."""
    return np.concatenate([[False], per_component])


def _per_label_mean(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``values`` per label 1..n-1 (0 where a label has no pixel)."""
    return (np.bincount(labels, weights=values, minlength=n) / np.maximum(np.bincount(labels, minlength=n), 1))[1:]


def _gradient(image: np.ndarray) -> np.ndarray:
    """Colour gradient magnitude: the strongest channel's Sobel magnitude after a 3×3 Gaussian blur."""
    strongest = None
    for channel in cv2.split(cv2.GaussianBlur(image, (3, 3), 0)):
        magnitude = cv2.magnitude(cv2.Sobel(channel, cv2.CV_32F, 1, 0), cv2.Sobel(channel, cv2.CV_32F, 0, 1))
        strongest = magnitude if strongest is None else cv2.max(strongest, magnitude)
    return strongest


def _edge_support(magnitude: np.ndarray, fg: np.ndarray, config: AuditConfig) -> np.ndarray:
    """Pixels within ``edge_tolerance`` of an image edge (see the module docstring)."""
    far = ~cv2.dilate(fg.view(np.uint8), np.ones((9, 9), np.uint8)).view(bool)
    background = magnitude[far] if np.count_nonzero(far) >= 0.01 * far.size else magnitude.ravel()
    flat = magnitude.ravel()
    k90 = int(0.9 * (flat.size - 1))
    floor = config.edge_min_gradient
    # Each term of the threshold is selected exactly only when it can exceed the others: a count
    # tells whether its quantile lies below the value at which it would (most photos: a flat
    # background far from the product, whose median gradient is 0, and a 90th percentile that
    # decides).
    factor, relative = config.edge_noise_factor, config.edge_relative
    if factor <= 0 or _kth_at_most(background, background.size // 2, floor / factor):
        noise_term = 0.0  # the median is below floor / factor: the noise term never decides
    else:
        noise_term = factor * _median(background)
    others = max(noise_term, floor)
    if relative <= 0 or _kth_at_most(flat, k90, others / relative):
        threshold = others
    else:
        (p90,) = _kth_smallest(flat, [k90], above=others / relative)
        threshold = max(relative * p90, others)
    size = 2 * config.edge_tolerance + 1
    return cv2.dilate((magnitude >= threshold).view(np.uint8), np.ones((size, size), np.uint8)).view(bool)


def _kth_at_most(values: np.ndarray, k: int, bound: float) -> bool:
    """Whether the ``k``-th smallest (0-based) of ``values`` is below ``bound`` by a margin of one
    part in a million (so that a term computed from it cannot reach a threshold computed from
    ``bound`` through rounding), found by counting instead of selecting."""
    return int(np.count_nonzero(values < bound * (1 - 1e-6))) > k


def _kth_smallest(values: np.ndarray, ks: list[int], above: float = 0.0) -> list[np.float32]:
    """The ``k``-th smallest (0-based) of a flat array of non-negative values, for each ``k``: what
    ``np.partition`` gives, found among the values above ``above`` only when every wanted one lies
    there (a photo's flat background makes half of a gradient map exactly zero, and most of the
    rest is small: selecting among all of them is several times slower)."""
    upper = values[values > above]
    below = values.size - upper.size
    if above > 0 and min(ks) < below:
        return _kth_smallest(values, ks)
    wanted = sorted({k - below for k in ks if k >= below})
    chosen = np.partition(upper, wanted) if wanted else upper
    return [values.dtype.type(0) if k < below else chosen[k - below] for k in ks]


def _median(values: np.ndarray) -> np.float32:
    """``np.median`` of a flat array of non-negative values (the mean of the two middle ones when their
    count is even), by :func:`_kth_smallest`."""
    n = values.size
    middle = _kth_smallest(values, [(n - 1) // 2, n // 2])
    return np.mean(np.array(middle, dtype=values.dtype))


def _suspect_holes(image: np.ndarray, magnitude: np.ndarray, fg: np.ndarray, bg_labels: np.ndarray, n: int,
                   hole: np.ndarray, enclosed: np.ndarray, config: AuditConfig) -> np.ndarray:
    """Per background component: a hole without an edge along its outline, coloured like the product."""
    if not hole.any():
        return hole
    labels = np.where(_lookup(hole)[bg_labels], bg_labels, 0).astype(np.float32)
    inside = labels > 0

    def grown(size: int) -> np.ndarray:  # the hole labels spread by size // 2 pixels
        return cv2.dilate(labels, np.ones((size, size), np.uint8))

    near, band = grown(3), grown(9)
    outline = (near > 0) & ~cv2.erode(inside.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
    interior = cv2.erode(inside.view(np.uint8), np.ones((7, 7), np.uint8)).view(bool)
    around = (band > 0) & (grown(5) == 0) & fg
    edge = _per_label_mean(near[outline].astype(np.intp), magnitude[outline], n)
    texture = np.maximum(_per_label_mean(bg_labels[interior], magnitude[interior], n),
                         _per_label_mean(band[around].astype(np.intp), magnitude[around], n))
    suspect = hole & (edge < config.min_hole_contrast * np.maximum(texture, 1.0))
    if not suspect.any():
        return suspect
    in_holes = _lookup(suspect)[bg_labels]
    likely = _likelier_product(image, fg, _lookup(~enclosed)[bg_labels], in_holes)
    return suspect & (_per_label_mean(bg_labels[in_holes], likely, n) >= 0.5)


def _likelier_product(image: np.ndarray, product: np.ndarray, background: np.ndarray,
                      where: np.ndarray) -> np.ndarray:
    """For the pixels in ``where``: is their colour at least as likely in the product as in the background?"""
    q = image >> 4
    index = (q[..., 0].astype(np.intp) << 8) | (q[..., 1].astype(np.intp) << 4) | q[..., 2]
    p_product = _smoothed(np.bincount(index[product], minlength=4096)) / max(np.count_nonzero(product), 1)
    p_background = _smoothed(np.bincount(index[background], minlength=4096)) / max(np.count_nonzero(background), 1)
    return (p_product >= p_background)[index[where]]


def _smoothed(histogram: np.ndarray) -> np.ndarray:
    """A 16×16×16 colour histogram summed over each bin's 3×3×3 neighbourhood."""
    h = np.pad(histogram.reshape(16, 16, 16).astype(np.float64), 1)
    for axis in range(3):
        h = h + np.roll(h, 1, axis) + np.roll(h, -1, axis)
    return h[1:-1, 1:-1, 1:-1].ravel()


def _model_check(probability: np.ndarray, fg: np.ndarray) -> tuple[float, float]:
    predicted = probability > 0.5
    union = np.count_nonzero(predicted | fg)
    iou = np.count_nonzero(predicted & fg) / union if union else 1.0
    inside = float(probability[predicted].sum())
    denominator = np.count_nonzero(predicted) + float(probability.sum()) - inside
    confidence = inside / denominator if denominator > 0 else 0.0  # finding nothing is no evidence
    return float(iou), float(confidence)
