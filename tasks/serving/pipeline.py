"""Production background removal: the batched pipeline from photos to cut-outs, and its outputs.

``iter_remove_backgrounds(urls, engine, config)`` runs images through an engine
(:mod:`tasks.serving.engines`): a thread pool reads,
decodes (EXIF orientation applied) and preprocesses images ahead of the model, the model runs on
batches, and the same pool turns each prediction into the outputs while the next batch runs:

* ``cutout_png``: RGBA PNG, alpha = the predicted probability (fully transparent pixels are black);
* ``composite_jpeg``: the product on a plain background (white by default), RGB JPEG;
* ``mask_png`` (``config.mask``): the alpha alone, grayscale PNG at the photo's size;
* ``config.cutout`` / ``config.composite`` turn the first two off (``bgremoval remove --only-mask``);
* optionally (``config.canvas``) cut-out and JPEG are cropped to the product and centred on a
  fixed canvas with a margin, aspect kept (the mask stays at the photo's size, aligned with it);
* ``quality``: :func:`tasks.serving.quality.quality_score` of the prediction.

The probability map, resized to the photo, is refined on the photo's own edges
(:func:`tasks.model.refine.refine_probability`, a guided filter; ``config.refine=None`` turns it
off) before any output is made from it; the quality score is taken on the network's own map.

:func:`cut_out_bytes` does the same for one image held in memory (stdin, an HTTP body).

A bad input (unreadable, empty, undecodable) gives a :class:`CutoutResult` with ``error`` set and
no outputs; the batch goes on. Inputs are only read. Preprocessing equals
:func:`tasks.model.preprocess.preprocess` (the same resize, then the normalisation on the small image,
which is the same affine map); the probability map goes back to the photo's size with
:func:`tasks.model.preprocess.resize_to_original`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from tasks.core import storage
from tasks.core.alpha import decontaminated_foreground, over_colour
from tasks.core.codecs import ImageTooLarge, decode_image, encode
from tasks.core.png import png_bytes
from tasks.core.limits import ASPECT_TOLERANCE, MAX_PIXELS, aspect_mismatch
from tasks.model.preprocess import prepare_input
from tasks.model.refine import RefineConfig, map_at_photo
from tasks.serving.engines import Engine, available_cores, unletterboxed
from tasks.serving.quality import QualityConfig, QualityScore, quality_score

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESULTS_FILE",
    "UNREAD_IMAGE_EXTENSIONS",
    "CutoutResult",
    "InferenceConfig",
    "OUTPUT_KINDS",
    "OutputKind",
    "SINGLE_OUTPUTS",
    "cut_out_bytes",
    "iter_remove_backgrounds",
    "InputListing",
    "list_images",
    "list_inputs",
    "earlier_lines",
    "logged_sources",
    "mark_output_folder",
    "merged_results",
    "mask_dir_for",
    "options_for",
    "output_urls",
    "planned_outputs",
    "parse_background",
    "parse_canvas",
    "without_output_clashes",
    "written_by",
    "remove_backgrounds",
    "remove_to",
    "results_line",
    "save_result",
    "single_output_config",
    "write_outputs",
]

#: Extensions listed as images in folders and prefixes (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

def parse_background(value: str | Sequence[int]) -> tuple[int, int, int]:
    """``'#rrggbb'`` (or ``'rrggbb'``, or an ``(r, g, b)`` triple) → ``(r, g, b)``; raises
    ``ValueError`` otherwise."""
    if not isinstance(value, str):
        rgb = tuple(int(v) for v in value)
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError(f"background must be three values in 0..255, got {value!r}")
        return rgb  # type: ignore[return-value]
    text = value.strip().lstrip("#")
    if len(text) != 6 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"background must look like '#rrggbb', got {value!r}")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def parse_canvas(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``'WxH'`` (or a ``(width, height)`` pair) → ``(width, height)``; None stays None; raises
    ``ValueError`` for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            width, height = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"canvas must look like WIDTHxHEIGHT (e.g. 1000x1333), got {value!r}") from None
    else:
        width, height = (int(v) for v in value)
    if width < 1 or height < 1:
        raise ValueError(f"canvas sides must be positive, got {width}x{height}")
    return width, height


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: its ``name`` (what ``bgremoval serve`` and the MLflow model call it), the
    :class:`InferenceConfig` ``flag`` that asks for it, the :class:`CutoutResult` ``field`` that holds
    its bytes and its ``media_type``."""

    name: str
    flag: str
    field: str
    media_type: str


#: Every output an image can get, by name: the one table the config flags, the result's fields, the
#: written files and the single-output callers are read from.
OUTPUT_KINDS: dict[str, OutputKind] = {kind.name: kind for kind in (
    OutputKind("cutout", "cutout", "cutout_png", "image/png"),
    OutputKind("jpeg", "composite", "composite_jpeg", "image/jpeg"),
    OutputKind("mask", "mask", "mask_png", "image/png"),
)}
#: The one output a caller of a single image asks for (``bgremoval serve``, the MLflow model), and its media type.
SINGLE_OUTPUTS: dict[str, str] = {name: kind.media_type for name, kind in OUTPUT_KINDS.items()}


@dataclass(frozen=True)
class InferenceConfig:
    """What :func:`iter_remove_backgrounds` produces and how fast.

    ``background``: the JPEG's background, ``'#rrggbb'``; ``canvas``: ``(width, height)`` to crop
    the product onto, or None for the photo's own frame; ``margin``: free border on the canvas, a
    share of each side; ``mask``: also encode the mask PNG; ``keep_probability``: keep the float
    probability map in the result (large: 4 bytes per pixel); ``cutout`` / ``composite``: encode
    the RGBA PNG / the JPEG on the background (at least one of the three outputs is needed);
    ``decontaminate``: give the soft edge of the cut-out and the JPEG the product's colours
    instead of the old background's (:func:`tasks.core.alpha.decontaminated_foreground`); ``refine``: pull the
    map's outline onto the photo's edges (:func:`tasks.model.refine.refine_probability`), None to publish the
    network's map as resized; ``keep_source``: keep the input
    file's bytes in the result (spares a second read when the original is stored too);
    ``batch_size``: images per model
    call; ``io_threads``: decode/encode threads (None: one per core); ``jpeg_quality``;
    ``png_compression``: zlib level 0-9 of the PNGs (1 is fast, 6 is PIL's default; 1-3 deflated by ISA-L,
    :mod:`tasks.core.png`);
    ``crop_threshold``: alpha level (0-1) that counts as product when cropping;
    ``quality``: how the quality score is computed; ``max_pixels``: photos whose header claims
    more pixels are refused before decoding (:data:`tasks.core.limits.MAX_PIXELS`, as in cleaning).
    """

    background: str = "#ffffff"
    canvas: tuple[int, int] | None = None
    margin: float = 0.05
    mask: bool = False
    cutout: bool = True
    composite: bool = True
    decontaminate: bool = False
    refine: RefineConfig | None = field(default_factory=RefineConfig)
    keep_probability: bool = False
    keep_source: bool = False
    batch_size: int = 4
    io_threads: int | None = None
    jpeg_quality: int = 92
    png_compression: int = 1
    crop_threshold: float = 0.5
    quality: QualityConfig = field(default_factory=QualityConfig)
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        parse_background(self.background)
        object.__setattr__(self, "canvas", parse_canvas(self.canvas))
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"margin must lie in [0, 0.5), got {self.margin}")
        if not (self.mask or self.cutout or self.composite):
            raise ValueError("nothing to produce: cutout, composite and mask are all off")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.io_threads is not None and self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.png_compression <= 9:
            raise ValueError(f"png_compression must lie in 0..9, got {self.png_compression}")
        if not 0 < self.crop_threshold < 1:
            raise ValueError(f"crop_threshold must lie in (0, 1), got {self.crop_threshold}")


def single_output_config(output: str, background: str = "#ffffff", decontaminate: bool = False,
                         max_pixels: int = MAX_PIXELS, refine: RefineConfig | None = RefineConfig()) -> InferenceConfig:
    """The :class:`InferenceConfig` that makes only ``output`` (a key of :data:`SINGLE_OUTPUTS`), with
    the edge refinement ``refine`` (None: plain maps; :func:`tasks.serving.engines.refinement_for`
    gives a model's own); raises ``ValueError`` for an unknown output or background."""
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {output!r}")
    flags = {kind.flag: name == output for name, kind in OUTPUT_KINDS.items()}
    return InferenceConfig(background=background, decontaminate=decontaminate, max_pixels=max_pixels,
                           refine=refine, **flags)


@dataclass
class CutoutResult:
    """One image's outcome; stays in the process (the caller writes the bytes, never XCom).

    ``stem``: output name (may hold ``/`` for images in sub-folders); ``source_url``;
    ``width``/``height``: the photo's size after EXIF orientation; ``cutout_png``,
    ``composite_jpeg``, ``mask_png``: encoded outputs (None when not made or on error);
    ``probability``: float32 map at the photo's size when ``keep_probability``;
    ``source_bytes``: the input file when ``keep_source``; ``quality``;
    ``error``: why the image failed (None when it worked); ``too_large``: it failed because its
    header claims more pixels than allowed (nothing was decoded); ``seconds``: from the start of its
    read to its outputs being ready.
    """

    stem: str
    source_url: str
    width: int = 0
    height: int = 0
    cutout_png: bytes | None = None
    composite_jpeg: bytes | None = None
    mask_png: bytes | None = None
    probability: np.ndarray | None = None
    source_bytes: bytes | None = None
    quality: QualityScore | None = None
    error: str | None = None
    too_large: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the image produced outputs."""
        return self.error is None

    @property
    def score(self) -> float | None:
        """The quality score, or None on error."""
        return None if self.quality is None else self.quality.score

    def output(self, kind: str) -> bytes | None:
        """The encoded output named ``kind`` (a key of :data:`OUTPUT_KINDS`)."""
        return getattr(self, OUTPUT_KINDS[kind].field)

    def summary(self) -> dict[str, Any]:
        """A small JSON-ready dict (stem, source, size, score and its parts, error): no pixels."""
        return {"stem": self.stem, "source_url": self.source_url, "width": self.width, "height": self.height,
                "score": self.score, "quality": None if self.quality is None else self.quality.to_dict(),
                "error": self.error, "seconds": round(self.seconds, 4)}


def _fit_box(box_w: int, box_h: int, canvas: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Size and offset of a ``box_w×box_h`` product scaled into ``canvas`` with ``margin``."""
    cw, ch = canvas
    avail_w, avail_h = max(1.0, cw * (1 - 2 * margin)), max(1.0, ch * (1 - 2 * margin))
    scale = min(avail_w / box_w, avail_h / box_h)
    w, h = max(1, min(cw, round(box_w * scale))), max(1, min(ch, round(box_h * scale)))
    return w, h, (cw - w) // 2, (ch - h) // 2


def _on_canvas(rgb: np.ndarray, alpha: np.ndarray, config: InferenceConfig) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the product (alpha ≥ ``crop_threshold``; the whole photo when none) and centre it
    on the canvas; returns the canvas-sized RGB and alpha."""
    assert config.canvas is not None
    ys, xs = np.nonzero(alpha >= round(config.crop_threshold * 255))
    if ys.size:
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    else:
        y0, y1, x0, x1 = 0, alpha.shape[0], 0, alpha.shape[1]
    w, h, ox, oy = _fit_box(int(x1 - x0), int(y1 - y0), config.canvas, config.margin)
    cw, ch = config.canvas
    out_rgb = np.zeros((ch, cw, 3), np.uint8)
    out_alpha = np.zeros((ch, cw), np.uint8)
    interp = cv2.INTER_AREA if w <= x1 - x0 else cv2.INTER_CUBIC
    out_rgb[oy:oy + h, ox:ox + w] = cv2.resize(rgb[y0:y1, x0:x1], (w, h), interpolation=interp)
    out_alpha[oy:oy + h, ox:ox + w] = cv2.resize(alpha[y0:y1, x0:x1], (w, h), interpolation=interp)
    return out_rgb, out_alpha


def _render(rgb: np.ndarray, prob: np.ndarray, config: InferenceConfig) -> dict[str, bytes]:
    """Encode the outputs of one image from its RGB pixels and full-size probability map."""
    alpha = cv2.convertScaleAbs(prob, alpha=255.0)  # rounds and saturates to uint8
    out: dict[str, bytes] = {}
    if config.mask:
        out["mask_png"] = png_bytes(alpha, config.png_compression)
    if not (config.cutout or config.composite):
        return out
    if config.decontaminate:
        rgb = decontaminated_foreground(rgb, alpha)
    if config.canvas is not None:
        rgb, alpha = _on_canvas(rgb, alpha, config)
    if config.composite:
        composite = over_colour(rgb, alpha, parse_background(config.background))
        out["composite_jpeg"] = encode(".jpg", cv2.cvtColor(composite, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
    if config.cutout:
        rgba = cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)
        rgba[..., 3] = alpha
        rgba = cv2.bitwise_and(rgba, rgba, mask=alpha)  # transparent pixels carry no colour: smaller files
        out["cutout_png"] = png_bytes(rgba, config.png_compression)
    return out


def cutout_with_mask(stem: str, source_url: str, data: bytes, mask: np.ndarray,
                     config: InferenceConfig) -> CutoutResult:
    """One photo's outputs from a mask a person drew or accepted, in place of the model's map.

    ``data``: the photo's bytes (decoded as the pipeline decodes them: EXIF applied, transparency on
    white); ``mask``: ``H×W`` ``uint8`` 0/255 of the photo's aspect at any size (the correction
    page's copy), resized to the photo bilinearly, so its outline is the one-pixel ramp a map gives.
    A photo that cannot be cut out comes back with ``error`` set.
    """
    result = CutoutResult(stem=stem, source_url=source_url)
    try:
        rgb = decode_image(data, max_pixels=config.max_pixels)
        height, width = rgb.shape[:2]
        if aspect_mismatch((mask.shape[1], mask.shape[0]), (width, height)) > ASPECT_TOLERANCE:
            raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]}, not of the photo's aspect ({width}x{height})")
        scaled = mask if mask.shape == (height, width) else cv2.resize(mask, (width, height),
                                                                       interpolation=cv2.INTER_LINEAR)
        result.width, result.height = width, height
        for key, value in _render(rgb, scaled.astype(np.float32) * np.float32(1 / 255), config).items():
            setattr(result, key, value)
    except (ValueError, cv2.error) as exc:
        result.error = f"cannot produce outputs: {exc}"
    return result


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

@dataclass
class _Loaded:
    result: CutoutResult
    started: float
    rgb: np.ndarray | None = None
    tensor: np.ndarray | None = None
    data: bytes | None = None


def _stem_of(url: str) -> str:
    return posixpath.splitext(posixpath.basename(url.rstrip("/")))[0]


def options_for(url: str, storage_options: dict | None) -> dict | None:
    """``storage_options`` for remote URLs, None for local paths (fsspec's local filesystem
    takes no s3 options)."""
    return storage_options if "://" in url and not url.startswith("file://") else None


def _load(item: tuple[str, str], engine: Engine, config: InferenceConfig, storage_options: dict | None) -> _Loaded:
    url, stem = item
    loaded = _Loaded(CutoutResult(stem=stem, source_url=url), time.perf_counter())
    try:
        data = storage.read_bytes(url, options_for(url, storage_options))
    except storage.OBJECT_ERRORS as exc:  # this photo is gone or unreadable; an unreachable store fails the run
        loaded.result.error = f"cannot read: {type(exc).__name__}: {exc}"
        return loaded
    return _decoded(loaded, data, engine, config)


def _decoded(loaded: _Loaded, data: bytes, engine: Engine, config: InferenceConfig) -> _Loaded:
    """``loaded`` with the photo decoded and the network input prepared, or its error set."""
    try:
        loaded.data = data
        rgb = decode_image(data, max_pixels=config.max_pixels)
        loaded.rgb = rgb
        loaded.result.height, loaded.result.width = rgb.shape[:2]
        loaded.tensor = prepare_input(rgb, engine.input_size, engine.resize, engine.mean, engine.std)
    except (ValueError, cv2.error) as exc:
        loaded.result.error = str(exc)
        loaded.result.too_large = isinstance(exc, ImageTooLarge)
    except Exception as exc:  # anything else (MemoryError, a decoder bug) fails this image, not the run
        loaded.data = loaded.rgb = None
        loaded.result.error = f"cannot load: {type(exc).__name__}: {exc}"
    return loaded


def _finish(loaded: _Loaded, prob_s: np.ndarray, sides: np.ndarray | None, engine: Engine,
            config: InferenceConfig) -> CutoutResult:
    result = loaded.result
    try:
        assert loaded.rgb is not None
        height, width = loaded.rgb.shape[:2]
        prob_s, sides = unletterboxed(prob_s, sides, engine, height, width)
        result.quality = quality_score(prob_s, sides, config.quality)
        prob = map_at_photo(np.ascontiguousarray(prob_s, dtype=np.float32), loaded.rgb, engine.input_size,
                            config.refine)
        for key, value in _render(loaded.rgb, prob, config).items():
            setattr(result, key, value)
        if config.keep_probability:
            result.probability = prob
        if config.keep_source:
            result.source_bytes = loaded.data
    except (ValueError, cv2.error) as exc:
        result.error = f"cannot produce outputs: {exc}"
    except Exception as exc:  # anything else fails this image, not the run
        result.error = f"cannot produce outputs: {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - loaded.started
    return result


def _items(urls: Iterable[str | tuple[str, str]]) -> Iterator[tuple[str, str]]:
    for entry in urls:
        yield (entry, _stem_of(entry)) if isinstance(entry, str) else (str(entry[0]), str(entry[1]))


def iter_remove_backgrounds(urls: Iterable[str | tuple[str, str]], engine: Engine,
                            config: InferenceConfig = InferenceConfig(),
                            storage_options: dict | None = None) -> Iterator[CutoutResult]:
    """Remove the background of every image, yielding a :class:`CutoutResult` per input, in
    input order, as soon as it is ready (memory stays bounded to a few batches).

    ``urls``: image URLs (stem = file name without extension) or ``(url, stem)`` pairs. Reading,
    decoding and preprocessing run ``config.io_threads`` wide ahead of the model; encoding runs
    in the same pool while the next batch is in the model. Failed images come back with
    ``error`` set; they never stop the run.
    """
    items = _items(urls)
    threads = config.io_threads or available_cores()
    batch_size = config.batch_size
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bgremoval-io") as pool:
        loads: deque[Future[_Loaded]] = deque()
        finishing: deque[Future[CutoutResult] | CutoutResult] = deque()

        def top_up() -> None:
            while len(loads) < 2 * batch_size:
                item = next(items, None)
                if item is None:
                    return
                loads.append(pool.submit(_load, item, engine, config, storage_options))

        def drain(keep: int) -> Iterator[CutoutResult]:
            while len(finishing) > keep:
                head = finishing.popleft()
                yield head.result() if isinstance(head, Future) else head

        top_up()
        while loads:
            taken: list[_Loaded] = []  # this batch's inputs in order, failed reads included
            while loads and sum(t.result.error is None for t in taken) < batch_size:
                taken.append(loads.popleft().result())
                top_up()
            batch = [t for t in taken if t.result.error is None]
            outputs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
            if batch:
                try:
                    probs, sides = engine.predict(np.stack([b.tensor for b in batch]))
                except Exception as exc:  # a model failure fails this batch, not the run
                    for b in batch:
                        b.result.error = f"model failed: {type(exc).__name__}: {exc}"
                else:
                    outputs = {id(b): (probs[k], None if sides is None else sides[k]) for k, b in enumerate(batch)}
            for t in taken:
                t.tensor = None
                if id(t) in outputs:
                    finishing.append(pool.submit(_finish, t, *outputs[id(t)], engine, config))
                else:
                    t.result.seconds = time.perf_counter() - t.started
                    finishing.append(t.result)
            yield from drain(keep=len(taken))  # this batch encodes while the next one is in the model
        yield from drain(keep=0)


def cut_out_bytes(data: bytes, engine: Engine, config: InferenceConfig = InferenceConfig(),
                  stem: str = "stdin", source: str = "-") -> CutoutResult:
    """Remove the background of one image given as encoded bytes (stdin, an HTTP body).

    The same steps and outputs as :func:`iter_remove_backgrounds` for one image; a photo that
    cannot be decoded or run comes back with ``error`` set. ``stem`` and ``source`` name it in
    the result.
    """
    loaded = _decoded(_Loaded(CutoutResult(stem=stem, source_url=source), time.perf_counter()), data, engine,
                      config)
    if loaded.result.error is not None:
        loaded.result.seconds = time.perf_counter() - loaded.started
        return loaded.result
    try:
        probs, sides = engine.predict(loaded.tensor[None])
    except Exception as exc:  # noqa: BLE001 - reported in the result, as in the batched pipeline
        loaded.result.error = f"model failed: {type(exc).__name__}: {exc}"
        loaded.result.seconds = time.perf_counter() - loaded.started
        return loaded.result
    loaded.tensor = None
    return _finish(loaded, probs[0], None if sides is None else sides[0], engine, config)


def remove_backgrounds(urls: Iterable[str | tuple[str, str]], engine: Engine,
                       options: InferenceConfig = InferenceConfig(),
                       storage_options: dict | None = None) -> list[CutoutResult]:
    """:func:`iter_remove_backgrounds` collected into a list (one result per input, in order).
    Each result keeps its encoded bytes: for large shards prefer the iterator and write as you go."""
    return list(iter_remove_backgrounds(urls, engine, options, storage_options))


def output_urls(stem: str, out_url: str, mask_dir: str = "masks") -> dict[str, str]:
    """Where :func:`write_outputs` puts an image's files: ``<out>/<stem>.png`` (cut-out),
    ``<out>/<stem>.jpg`` (on the background), ``<out>/<mask_dir>/<stem>.png`` (mask;
    ``<out>/<stem>.png`` when ``mask_dir`` is empty, for a run that makes the mask alone)."""
    return {"cutout_png": storage.join(out_url, f"{stem}.png"),
            "composite_jpeg": storage.join(out_url, f"{stem}.jpg"),
            "mask_png": storage.join(out_url, mask_dir, f"{stem}.png") if mask_dir
            else storage.join(out_url, f"{stem}.png")}


def write_outputs(result: CutoutResult, out_url: str, storage_options: dict | None = None,
                  mask_dir: str = "masks", protected: Collection[str] = ()) -> dict[str, str]:
    """Write a result's encoded outputs atomically under ``out_url`` (see :func:`output_urls`).
    Returns ``{output name: URL}`` of the files written (empty for a failed image). Raises
    ``ValueError``, before writing any of them, when an output would overwrite the result's own
    input or one of ``protected`` (the run's other inputs, as :func:`path_key` gives them)."""
    if not result.ok:
        return {}
    planned = {key: url for key, url in output_urls(result.stem, out_url, mask_dir).items()
               if getattr(result, key) is not None}
    forbidden = {path_key(result.source_url), *protected}
    for url in planned.values():
        if path_key(url) in forbidden:
            raise ValueError(f"refusing to overwrite the input {url} with an output")
    return {key: storage.write_bytes(url, getattr(result, key), options_for(url, storage_options))
            for key, url in planned.items()}


def save_result(result: CutoutResult, out_url: str, config: InferenceConfig,
                storage_options: dict | None = None, protected: Collection[str] = ()) -> dict[str, str]:
    """:func:`write_outputs` for a result of ``config`` (masks named by :func:`mask_dir_for`); a
    write that fails sets the result's ``error`` instead of raising. Returns the files written."""
    if not result.ok:
        return {}
    try:
        return write_outputs(result, out_url, storage_options, mask_dir=mask_dir_for(config), protected=protected)
    except (OSError, ValueError) as exc:
        result.error = f"cannot write outputs: {exc}"
        return {}


#: A URL or local path in the form two names of the same file share (:func:`tasks.core.storage.place_key`).
path_key = storage.place_key


def relative_inside(url: str, folder: str) -> str | None:
    """``url``'s path below ``folder`` with ``/`` separators (both local paths, or both URLs); None
    when it does not lie below it."""
    sep = "/" if "://" in folder else os.sep
    inner, outer = path_key(url), path_key(folder).rstrip(sep) + sep
    return inner[len(outer):].replace(os.sep, "/") if inner.startswith(outer) else None


def check_output_location(inputs: Sequence[str], out_url: str, storage_options: dict | None = None) -> None:
    """Refuse, before any photo is read, an output location that cannot work: an existing file, an
    input folder itself (its cut-outs would be read back as photos on the next run, and a photo named
    like an output overwritten; a folder inside an input folder is fine, it is left out of the
    inputs), or a remote location that cannot be reached (no credentials, no bucket). Raises
    ``ValueError`` saying which."""
    out_key = path_key(out_url)
    for entry in inputs:
        if path_key(entry) == out_key:
            raise ValueError(f"the output location {out_url} is an input folder: give another one "
                             "(a folder inside it is fine, it is left out of the inputs)")
        if path_key(_parent(entry)) == out_key and _is_file(entry, storage_options):
            raise ValueError(f"the output location {out_url} holds the input {entry}: outputs there could replace "
                             "photos; give another folder")
    if "://" not in out_url:
        if os.path.isfile(out_url):
            raise ValueError(f"the output location {out_url} is a file: give a folder (or '-' for stdout)")
        return
    fs, path = storage.filesystem(out_url, options_for(out_url, storage_options))
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)  # the endpoint and the credentials answer here
    except PermissionError:
        pass  # a role may write objects without reading the bucket: the writes will tell
    except FileNotFoundError:
        raise ValueError(f"the output location {out_url}: no bucket {bucket!r}") from None
    except Exception as exc:  # noqa: BLE001 - whatever else the store raises, the run cannot write there
        raise ValueError(f"cannot reach the output location {out_url}: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Listing inputs
# ----------------------------------------------------------------------------------------------

def _parent(url: str) -> str:
    return posixpath.dirname(url.rstrip("/")) if "://" in url else os.path.dirname(os.path.abspath(url))


def _is_file(url: str, storage_options: dict | None) -> bool:
    return storage.is_file(url, options_for(url, storage_options))


#: What ``bgremoval remove`` writes into every output folder: a folder holding one is an earlier run's output.
RESULTS_FILE = "results.jsonl"


def left_out_line(folder: str) -> str:
    """What ``remove`` says of an earlier run's output folder among its inputs."""
    return f"left out: {folder} (an earlier run's output: it holds {RESULTS_FILE})"


#: Photo formats a studio or a phone writes that ``remove`` does not read: in a folder they are named
#: as left out (exit status 1), not passed over in silence.
UNREAD_IMAGE_EXTENSIONS: tuple[str, ...] = (".gif", ".heic", ".heif", ".avif", ".jxl", ".psd", ".dng", ".cr2",
                                            ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2")


@dataclass(frozen=True)
class InputListing:
    """What :func:`list_inputs` found: the photos to take (``(url, stem)``), the inputs left out and why,
    every photo listed, those left out included (what no output may replace), the folders below an
    input folder left out as earlier outputs (``earlier_outputs``), and each photo's ``(size, ETag,
    modified)`` as listed (``versions``: what changes when a photo is written again)."""

    items: list[tuple[str, str]]
    problems: list[str]
    listed: frozenset[str]
    earlier_outputs: tuple[str, ...] = ()
    versions: dict[str, tuple[int, str, str]] = field(default_factory=dict)


def list_images(inputs: Sequence[str], storage_options: dict | None = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS,
                exclude: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """:func:`list_inputs`'s ``(items, problems)``."""
    listing = list_inputs(inputs, storage_options, extensions, exclude)
    return listing.items, listing.problems


def earlier_lines(out_url: str, storage_options: dict | None = None) -> list[str]:
    """The lines of the :data:`RESULTS_FILE` earlier runs left in ``out_url`` ([] when none)."""
    url, options = storage.join(out_url, RESULTS_FILE), options_for(out_url, storage_options)
    if not storage.exists(url, options):
        return []
    return [line for line in storage.read_bytes(url, options).decode().splitlines() if line.strip()]


def _logged(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """``(line, its JSON)`` of the results lines that parse as an object."""
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield line, entry


def written_by(lines: Iterable[str]) -> set[str]:
    """The files (as :func:`path_key` gives them) that the runs logged in ``lines`` (results lines) wrote."""
    return {path_key(url) for _, entry in _logged(lines) for url in (entry.get("outputs") or {}).values()}


def logged_sources(lines: Iterable[str]) -> set[str]:
    """The photos that results lines were written for."""
    return {entry["source_url"] for _, entry in _logged(lines) if entry.get("source_url")}


def merged_results(earlier: Sequence[str], lines: Sequence[str]) -> list[str]:
    """``earlier`` results lines, less those of photos ``lines`` has again, then ``lines``: one line per
    photo, the latest, whose ``outputs`` also keep the files earlier runs wrote for it (a run with
    fewer outputs, or a failed one, writes none of them again), so that the log names every file the
    runs wrote into the folder and a later run may replace them."""
    redone = logged_sources(lines)
    kept, before = [], {}
    for line, entry in _logged(earlier):
        if entry.get("source_url") in redone:
            before.setdefault(entry["source_url"], {}).update(entry.get("outputs") or {})
        else:
            kept.append(line)
    for line, entry in _logged(lines):
        if before.get(entry.get("source_url")):
            line = json.dumps({**entry, "outputs": {**before[entry["source_url"]], **(entry.get("outputs") or {})}})
        kept.append(line)
    return kept


def _kind(relpath: str, allowed: Sequence[str], skip: str | None, outputs: Sequence[str]) -> str:
    """What a file below an input folder is to :func:`list_inputs`: ``"photo"``, ``"output"`` (a photo
    in the output folder or an earlier one), ``"unread"`` (:data:`UNREAD_IMAGE_EXTENSIONS`) or ``"other"``."""
    ext = posixpath.splitext(relpath)[1].lower()
    if skip and relpath.startswith(skip + "/") or any(relpath.startswith(folder + "/") for folder in outputs):
        return "output" if ext in allowed else "other"
    return "photo" if ext in allowed else "unread" if ext in UNREAD_IMAGE_EXTENSIONS else "other"


def list_inputs(inputs: Sequence[str], storage_options: dict | None = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS,
                exclude: str | None = None, skip_earlier_outputs: bool = False,
                written: Collection[str] | None = None) -> InputListing:
    """Expand files, folders and ``s3://`` prefixes into ``(url, stem)`` pairs.

    A file or object is taken whatever its extension; a folder or prefix contributes the files
    below it (recursively) with an image extension, the stem being the path relative to it
    without extension, except those under ``exclude`` when it lies inside that folder (the run's
    output location) and, with ``skip_earlier_outputs`` (``bgremoval remove``), those in a
    subfolder holding a :data:`RESULTS_FILE` (an earlier run's output location: its cut-outs are
    not photos to cut out again; the input folder itself is listed whatever it holds). The photos in
    an output folder inside an input folder are not taken, and those no run wrote there (``written``:
    the :func:`path_key` of the files earlier runs wrote, by default read from its
    :data:`RESULTS_FILE`) are ``listed``: photos someone put there, which no output replaces.
    ``problems`` lists inputs that do not exist, names two inputs would share (the later one is
    left out) and photos in a format ``remove`` does not read (:data:`UNREAD_IMAGE_EXTENSIONS`).
    """
    items: list[tuple[str, str]] = []
    problems: list[str] = []
    listed: set[str] = set()
    versions: dict[str, tuple[int, str, str]] = {}
    seen: dict[str, str] = {}
    earlier: list[str] = []
    allowed = tuple(e.lower() for e in extensions)

    def add(obj: storage.ObjectInfo, stem: str) -> None:
        listed.add(path_key(obj.url))
        if stem in seen:
            problems.append(f"{obj.url}: left out, its output name {stem!r} is taken by {seen[stem]}")
            return
        seen[stem] = obj.url
        items.append((obj.url, stem))
        versions[obj.url] = (obj.size, obj.etag, obj.modified)

    for entry in inputs:
        options = options_for(entry, storage_options)
        fs, path = storage.filesystem(entry, options)
        if fs.isfile(path):
            info = storage.object_info(fs, path, posixpath.basename(path), fs.info(path))
            add(dataclasses.replace(info, url=entry), _stem_of(entry))
            continue
        skip = relative_inside(exclude, entry) if exclude else None  # the output folder inside this one
        objects = list(storage.list_objects(entry, options))
        outputs = sorted({posixpath.dirname(o.relpath) for o in objects if skip_earlier_outputs
                          and posixpath.basename(o.relpath) == RESULTS_FILE and "/" in o.relpath})
        earlier += [storage.join(entry, folder) for folder in outputs if folder != skip]
        kinds = [(obj, _kind(obj.relpath, allowed, skip, outputs)) for obj in objects]
        if not any(k == "photo" for _, k in kinds) and not fs.exists(path):
            problems.append(f"{entry}: no such file, folder or prefix")
        if skip and written is None:
            written = written_by(earlier_lines(exclude, storage_options))
        for obj, what in kinds:
            if what == "photo":
                add(obj, posixpath.splitext(obj.relpath)[0])
            elif what == "unread":
                problems.append(f"{obj.url}: left out, {posixpath.splitext(obj.relpath)[1]} photos are not read "
                                f"(convert it to JPEG, PNG or WebP)")
            elif what == "output" and skip and obj.relpath.startswith(skip + "/") and path_key(obj.url) not in written:
                listed.add(path_key(obj.url))  # a photo someone put in the output folder: never replaced
    return InputListing(items, problems, frozenset(listed), tuple(earlier), versions)


def mark_output_folder(out_url: str, storage_options: dict | None = None) -> None:
    """Write an empty :data:`RESULTS_FILE` into ``out_url`` unless it holds one: the folder is a run's
    output from its first file on, so that a run killed half-way leaves cut-outs a later run on the
    folder around it leaves out, not photos to cut out again."""
    url, options = storage.join(out_url, RESULTS_FILE), options_for(out_url, storage_options)
    if not storage.exists(url, options):
        storage.write_text(url, "", options)


def planned_outputs(stem: str, out_url: str, config: InferenceConfig) -> list[str]:
    """The files :func:`save_result` writes for a photo of ``stem`` under ``config``."""
    urls = output_urls(stem, out_url, mask_dir_for(config))
    return [urls[kind.field] for kind in OUTPUT_KINDS.values() if getattr(config, kind.flag)]


def without_output_clashes(items: Sequence[tuple[str, str]], out_url: str, config: InferenceConfig,
                           first: Collection[str] = ()) -> tuple[list[tuple[str, str]], list[str]]:
    """``items`` (``(url, stem)``) less those whose files would land on an earlier item's (``x.jpg`` and
    ``masks/x.jpg`` with ``--mask``: both would write ``masks/x.png``), and a line naming each. The
    photos in ``first`` (a watch's photos already cut out) come before the others, whatever their names."""
    taken: dict[str, str] = {}
    kept, problems = [], []
    for url, stem in sorted(items, key=lambda item: item[0] not in first):  # stable: the listing's order
        planned = planned_outputs(stem, out_url, config)
        clash = next((u for u in planned if path_key(u) in taken), None)
        if clash is not None:
            problems.append(f"{url}: left out, its output {clash} would replace one of {taken[path_key(clash)]}'s")
            continue
        taken.update((path_key(u), url) for u in planned)
        kept.append((url, stem))
    return kept, problems


def results_line(result: CutoutResult, written: dict[str, str] | None = None, threshold: float | None = None,
                 model: str | None = None) -> str:
    """One JSON line for a results log: :meth:`CutoutResult.summary` plus the files written and the
    ``model`` that made them (an engine's ``source``: a registered model's version, a file), and with
    the model's calibrated ``threshold``, ``below_threshold`` (production would send the photo to a person)."""
    line = {**result.summary(), "outputs": written or {}}
    if model is not None:
        line["model"] = model
    if threshold is not None and result.ok:
        line["below_threshold"] = bool(result.score < threshold)
    return json.dumps(line)




def mask_dir_for(config: InferenceConfig) -> str:
    """The ``mask_dir`` of :func:`write_outputs` for a config: masks go to ``masks/`` beside the cut-outs, or take the cut-out's name when they are the
    only output (as rembg's ``--only-mask`` does)."""
    return "" if config.mask and not (config.cutout or config.composite) else "masks"


def remove_to(inputs: Sequence[str], out_url: str, engine: Engine, config: InferenceConfig = InferenceConfig(),
              storage_options: dict | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, threshold: float | None = None) -> dict[str, Any]:
    """What ``bgremoval remove`` does: list ``inputs`` (:func:`list_inputs`; an output location
    inside an input folder is left out), remove the backgrounds (:func:`iter_remove_backgrounds`)
    with a tqdm progress bar, write each result's files under ``out_url`` as it comes
    (:func:`write_outputs`; never over any listed photo) and a ``results.jsonl`` line per image (after
    the earlier runs' lines of the other photos: :func:`merged_results`), and
    report every failure through ``log`` (default: a line on stderr that keeps the progress bar
    intact). ``storage_options`` apply to remote URLs. Interrupted (Ctrl-C), it stops, writes
    ``results.jsonl`` for the images done so far and returns with ``interrupted`` set.

    Returns ``{"images", "ok", "failed", "empty", "below_threshold", "threshold", "problems",
    "interrupted", "seconds", "images_per_s", "out_url", "results_url"}``: ``empty`` counts cut-outs
    in which the model found nothing (quality score 0), ``below_threshold`` those scored under
    ``threshold`` (the model's calibrated routing threshold; None without one), which production
    would send to a person.
    """
    import sys

    from tqdm import tqdm

    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    earlier = earlier_lines(out_url, storage_options)
    listing = list_inputs(inputs, storage_options, exclude=out_url, skip_earlier_outputs=True,
                          written=written_by(earlier))
    items, clashes = without_output_clashes(listing.items, out_url, config, first=logged_sources(earlier))
    problems = [*listing.problems, *clashes]
    for problem in problems:
        log(f"skipped: {problem}")
    for folder in listing.earlier_outputs:
        log(left_out_line(folder))
    results_url = storage.join(out_url, RESULTS_FILE)
    out_options = options_for(out_url, storage_options)
    if items:
        mark_output_folder(out_url, storage_options)
    started = time.perf_counter()
    ok, failed, empty, below, lines, interrupted = 0, 0, 0, 0, [], False
    results = iter_remove_backgrounds(items, engine, config, storage_options)
    try:
        for result in tqdm(results, total=len(items), desc="removing backgrounds", unit="img",
                           disable=not progress):
            written = save_result(result, out_url, config, storage_options, protected=listing.listed)
            if result.ok:
                ok += 1
                empty += result.score == 0.0
                below += threshold is not None and result.score < threshold
            else:
                failed += 1
                log(f"failed: {result.source_url}: {result.error}")
            lines.append(results_line(result, written, threshold, engine.source))
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - started
    if lines:
        storage.write_text(results_url, "\n".join(merged_results(earlier, lines)) + "\n", out_options)
    done = ok + failed
    return {"images": len(items), "ok": ok, "failed": failed, "empty": empty, "below_threshold": below,
            "threshold": threshold, "problems": problems, "interrupted": interrupted,
            "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 3) if seconds > 0 and done else 0.0,
            "out_url": out_url, "results_url": results_url if lines else None}
