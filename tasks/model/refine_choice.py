"""How cut-outs are edge-refined, and whether a model's are: measured once per model, followed at inference.

Edge refinement (:mod:`tasks.model.refine`) helps a model whose outline is loose and can hurt one
whose outline is already tight: on real photos it added 0.1-0.2 point of mean IoU to the published
U2-NetP zero-shot and to a short fine-tune at 192 px, and took 0.1 point from the fine-tune at
320 px on photos of people (``benchmarks/README.md``, "Edge refinement"). So the training DAG's
calibration stage scores the new model's validation pairs both ways and writes the choice next to
the model (``refinement.json``); it travels into the registry with the model, and every inference
path follows it unless told otherwise (``auto``). A model without a measured choice (rembg's file,
the published weights) is refined, as measured on the published weights.

Refinement is chosen only when its gain is larger than the noise of the measurement: the mean of the
per-pair gains (refined minus plain IoU, on the same pairs) must exceed :data:`MIN_GAIN_Z` standard
errors, on at least :data:`MIN_PAIRS` pairs. Otherwise the plain maps, which cost less, are kept: a
small validation split, or a gain within the spread of the per-pair gains, cannot show that
refinement pays. A choice saved before this rule (no ``gain_se``) is followed as it was made.

The module holds settings only (no OpenCV): the DAG files' forms and the registry import it at parse
time; the filter itself is :mod:`tasks.model.refine`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields

from tasks.core import layout, storage

__all__ = ["MIN_GAIN_Z", "MIN_PAIRS", "REFINE_CHOICE_FILE", "REFINE_MODES", "RefineChoice", "RefineConfig",
           "choose_refinement", "load_refine_choice", "resolve_refine", "save_refine_choice"]

#: File name of the choice saved next to a model (``<model folder>/refinement.json``).
REFINE_CHOICE_FILE = layout.REFINE_CHOICE_FILE
#: ``auto`` follows the model's measured choice (refined when there is none); ``on``/``off`` force it.
REFINE_MODES = ("auto", "on", "off")
#: Refinement is chosen when its mean per-pair gain exceeds this many standard errors (one-sided, about
#: 95 % under the normal approximation of a mean over many pairs) …
MIN_GAIN_Z = 1.645
#: … measured on at least this many pairs (fewer cannot show a gain: the plain maps stay).
MIN_PAIRS = 30


@dataclass(frozen=True)
class RefineConfig:
    """How :func:`tasks.model.refine.refine_probability` refines. ``radius``: the window's half size in photo pixels for
    a photo no larger than the network input, times the photo's scale above it (rounded, at least 1);
    ``eps``: the regularisation of the linear fit, in units of the luminance's variance on [0, 1]
    (smaller follows weaker edges)."""

    radius: float = 2.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not self.radius > 0:
            raise ValueError(f"radius must be positive, got {self.radius!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")


@dataclass(frozen=True)
class RefineChoice:
    """A model's measured choice on ``n`` pairs of ``split``: ``refine`` when the refined maps' mean
    IoU beat the plain maps' by more than the noise (see the module docstring); ``radius``/``eps``:
    the :class:`RefineConfig` measured; ``gain_se``: the standard error of the mean per-pair gain
    (None for a single pair, or a choice saved before it was recorded)."""

    refine: bool
    plain_mean_iou: float
    refined_mean_iou: float
    n: int
    split: str
    radius: float
    eps: float
    gain_se: float | None = None

    def config(self) -> RefineConfig | None:
        """The refinement to publish with: the measured one, or None (plain maps)."""
        return RefineConfig(self.radius, self.eps) if self.refine else None

    def describe(self) -> str:
        """One line: the choice, the figures it came from and, when refinement scored higher but is
        off, why."""
        gain = self.refined_mean_iou - self.plain_mean_iou
        figures = (f"measured for this model on {self.n} {self.split} pairs: mean IoU refined "
                   f"{self.refined_mean_iou * 100:.3f} % vs plain {self.plain_mean_iou * 100:.3f} %")
        if self.gain_se is not None:
            figures += f", gain {gain * 100:+.3f} ± {self.gain_se * 100:.3f} point"
        if not self.refine and gain > 0:
            figures += (f"; fewer than {MIN_PAIRS} pairs cannot show a gain" if self.n < MIN_PAIRS
                        else "; within the noise, so the plain maps, which cost less, are kept")
        return f"{'on' if self.refine else 'off'} ({figures})"


def choose_refinement(plain_ious: Sequence[float], refined_ious: Sequence[float], split: str,
                      config: RefineConfig = RefineConfig()) -> RefineChoice:
    """Refine when the mean per-pair gain of the refined maps over the plain ones (IoUs of the same
    pairs, in the same order) exceeds :data:`MIN_GAIN_Z` standard errors on at least
    :data:`MIN_PAIRS` pairs; otherwise keep the plain maps, which cost less. Raises ``ValueError``
    for no pairs or unequal lengths."""
    if len(plain_ious) != len(refined_ious) or not plain_ious:
        raise ValueError(f"need the same non-zero number of plain and refined IoUs, got {len(plain_ious)} "
                         f"and {len(refined_ious)}")
    n = len(plain_ious)
    plain = sum(map(float, plain_ious)) / n
    refined = sum(map(float, refined_ious)) / n
    gains = [float(r) - float(p) for p, r in zip(plain_ious, refined_ious)]
    mean_gain = sum(gains) / n
    gain_se = math.sqrt(sum((g - mean_gain) ** 2 for g in gains) / (n - 1) / n) if n > 1 else None
    refine = n >= MIN_PAIRS and gain_se is not None and mean_gain > 0 and mean_gain > MIN_GAIN_Z * gain_se
    return RefineChoice(refine=refine, plain_mean_iou=plain, refined_mean_iou=refined, n=n, split=split,
                        radius=float(config.radius), eps=float(config.eps), gain_se=gain_se)


def save_refine_choice(choice: RefineChoice, folder_url: str, storage_options: dict | None = None) -> str:
    """Write ``choice`` as ``<folder_url>/refinement.json``; returns the URL written."""
    return storage.write_text(storage.join(folder_url, REFINE_CHOICE_FILE), json.dumps(asdict(choice), indent=2),
                              storage_options)


def load_refine_choice(folder_url: str | None, storage_options: dict | None = None) -> RefineChoice | None:
    """The choice saved in a model folder, or None when there is none (or no folder)."""
    if not folder_url:
        return None
    url = storage.join(folder_url, REFINE_CHOICE_FILE)
    if not storage.exists(url, storage_options):
        return None
    saved = json.loads(storage.read_bytes(url, storage_options))
    required = [f.name for f in fields(RefineChoice) if f.default is MISSING]
    missing = [name for name in required if not isinstance(saved, dict) or name not in saved]
    if missing:
        raise ValueError(f"{url} is not a refinement choice: it lacks {', '.join(missing)}")
    # unknown keys (a later version's) are ignored; a key this version added takes its default
    return RefineChoice(**{f.name: saved[f.name] for f in fields(RefineChoice) if f.name in saved})


#: Why ``auto`` refines a model that has no measured choice.
NO_CHOICE = "the model has no measured choice; refinement pays on the published weights"


def resolve_refine(mode: str | bool, choice: RefineChoice | None, config: RefineConfig = RefineConfig(),
                   no_choice: str = NO_CHOICE) -> tuple[RefineConfig | None, str]:
    """The refinement to publish with under ``mode`` (one of :data:`REFINE_MODES`; True/False and
    ``"true"``/``"false"`` mean on/off) for a model whose measured choice is ``choice``.

    Returns ``(RefineConfig or None, a sentence saying which and why)``. ``on`` uses ``config``;
    ``auto`` uses the measured choice, or ``config`` when the model has none (``no_choice`` says
    why). Raises ``ValueError`` for another mode."""
    mode = {True: "on", False: "off", "true": "on", "false": "off"}.get(mode, mode)
    if mode not in REFINE_MODES:
        raise ValueError(f"refine must be one of {', '.join(REFINE_MODES)}, got {mode!r}")
    if mode == "on":
        return config, "on (asked for)"
    if mode == "off":
        return None, "off (asked for)"
    if choice is None:
        return config, f"on ({no_choice})"
    return choice.config(), choice.describe()
