"""How cut-outs are edge-refined, and whether a model's are: measured once per model, followed at inference.

Edge refinement (:mod:`tasks.model.refine`) helps a model whose outline is loose and can hurt one
whose outline is already tight: on real photos it added 0.1-0.2 point of mean IoU to the published
U2-NetP zero-shot and to a short fine-tune at 192 px, and took 0.1 point from the fine-tune at
320 px on photos of people (``benchmarks/README.md``, "Edge refinement"). So the training DAG's
calibration stage scores the new model's validation pairs both ways and writes the choice next to
the model (``refinement.json``); it travels into the registry with the model, and every inference
path follows it unless told otherwise (``auto``). A model without a measured choice (rembg's file,
the published weights) is refined, as measured on the published weights.

The module holds settings only (no OpenCV): the DAG files' forms and the registry import it at parse
time; the filter itself is :mod:`tasks.model.refine`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from tasks.core import layout, storage

__all__ = ["REFINE_CHOICE_FILE", "REFINE_MODES", "RefineChoice", "RefineConfig", "choose_refinement",
           "load_refine_choice", "resolve_refine", "save_refine_choice"]

#: File name of the choice saved next to a model (``<model folder>/refinement.json``).
REFINE_CHOICE_FILE = layout.REFINE_CHOICE_FILE
#: ``auto`` follows the model's measured choice (refined when there is none); ``on``/``off`` force it.
REFINE_MODES = ("auto", "on", "off")


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
    """A model's measured choice: ``refine`` when the refined maps' mean IoU beat the plain maps'
    on ``n`` pairs of ``split``; ``radius``/``eps``: the :class:`RefineConfig` measured."""

    refine: bool
    plain_mean_iou: float
    refined_mean_iou: float
    n: int
    split: str
    radius: float
    eps: float

    def config(self) -> RefineConfig | None:
        """The refinement to publish with: the measured one, or None (plain maps)."""
        return RefineConfig(self.radius, self.eps) if self.refine else None

    def describe(self) -> str:
        """One line: the choice and the two figures it came from."""
        return (f"{'on' if self.refine else 'off'} (measured for this model on {self.n} {self.split} pairs: "
                f"mean IoU refined {self.refined_mean_iou * 100:.3f} % vs plain {self.plain_mean_iou * 100:.3f} %)")


def choose_refinement(plain_ious: Sequence[float], refined_ious: Sequence[float], split: str,
                      config: RefineConfig = RefineConfig()) -> RefineChoice:
    """Refine when the refined maps' mean IoU is above the plain maps' on the same pairs (a tie
    keeps the plain maps: they cost less). Raises ``ValueError`` for no pairs or unequal lengths."""
    if len(plain_ious) != len(refined_ious) or not plain_ious:
        raise ValueError(f"need the same non-zero number of plain and refined IoUs, got {len(plain_ious)} "
                         f"and {len(refined_ious)}")
    plain = sum(map(float, plain_ious)) / len(plain_ious)
    refined = sum(map(float, refined_ious)) / len(refined_ious)
    return RefineChoice(refine=refined > plain, plain_mean_iou=plain, refined_mean_iou=refined, n=len(plain_ious),
                        split=split, radius=float(config.radius), eps=float(config.eps))


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
    return RefineChoice(**{f.name: saved[f.name] for f in fields(RefineChoice)})  # fields added later are ignored


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
