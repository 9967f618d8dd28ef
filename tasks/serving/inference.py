"""Production background removal: a model engine, the batched pipeline, and its outputs.

``load_engine(source)`` opens a model — a ``.onnx`` file, a folder/URL holding ``model.onnx``
and/or ``model.pt`` + ``config.json`` (the training output layout), or a registry URI
``models:/<name>@<alias>`` / ``models:/<name>/<version>`` — as an :class:`Engine`: ONNX Runtime on
the CPU, PyTorch on a CUDA GPU or when only ``model.pt`` exists.

``iter_remove_backgrounds(urls, engine, config)`` runs images through it: a thread pool reads,
decodes (EXIF orientation applied) and preprocesses images ahead of the model, the model runs on
batches, and the same pool turns each prediction into the outputs while the next batch runs:

* ``cutout_png``: RGBA PNG, alpha = the predicted probability (fully transparent pixels are black);
* ``composite_jpeg``: the product on a plain background (white by default), RGB JPEG;
* ``mask_png`` (``config.mask``): the alpha alone, grayscale PNG at the photo's size;
* optionally (``config.canvas``) cut-out and JPEG are cropped to the product and centred on a
  fixed canvas with a margin, aspect kept (the mask stays at the photo's size, aligned with it);
* ``quality``: :func:`tasks.serving.quality.quality_score` of the prediction.

A bad input (unreadable, empty, undecodable) gives a :class:`CutoutResult` with ``error`` set and
no outputs; the batch goes on. Inputs are only read. Preprocessing equals
:func:`tasks.model.preprocess.preprocess` (the same resize, then the normalisation on the small image,
which is the same affine map); the probability map goes back to the photo's size with
:func:`tasks.model.preprocess.resize_to_original`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from tasks.core import storage
from tasks.core.codecs import decode_image, encode
from tasks.model.pretrained import PRETRAINED, find_pretrained_onnx, require_pretrained_onnx
from tasks.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, letterbox_box, prepare_input, resize_to_original
from tasks.serving.quality import QualityConfig, QualityScore, quality_score

__all__ = [
    "IMAGE_EXTENSIONS",
    "CutoutResult",
    "Engine",
    "FlipAveragedEngine",
    "InferenceConfig",
    "OnnxEngine",
    "TorchEngine",
    "decode_image",
    "default_model",
    "iter_remove_backgrounds",
    "list_images",
    "load_engine",
    "output_urls",
    "parse_background",
    "parse_canvas",
    "prepare_input",
    "remove_backgrounds",
    "remove_to",
    "results_line",
    "write_outputs",
]

#: Extensions listed as images in folders and prefixes (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


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
class InferenceConfig:
    """What :func:`iter_remove_backgrounds` produces and how fast.

    ``background``: the JPEG's background, ``'#rrggbb'``; ``canvas``: ``(width, height)`` to crop
    the product onto, or None for the photo's own frame; ``margin``: free border on the canvas, a
    share of each side; ``mask``: also encode the mask PNG; ``keep_probability``: keep the float
    probability map in the result (large: 4 bytes per pixel); ``keep_source``: keep the input
    file's bytes in the result (spares a second read when the original is stored too);
    ``batch_size``: images per model
    call; ``io_threads``: decode/encode threads (None: one per core); ``jpeg_quality``;
    ``png_compression``: zlib level 0-9 of the PNGs (1 is fast, 6 is PIL's default);
    ``crop_threshold``: alpha level (0-1) that counts as product when cropping;
    ``quality``: how the quality score is computed.
    """

    background: str = "#ffffff"
    canvas: tuple[int, int] | None = None
    margin: float = 0.05
    mask: bool = False
    keep_probability: bool = False
    keep_source: bool = False
    batch_size: int = 4
    io_threads: int | None = None
    jpeg_quality: int = 92
    png_compression: int = 1
    crop_threshold: float = 0.5
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        parse_background(self.background)
        object.__setattr__(self, "canvas", parse_canvas(self.canvas))
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"margin must lie in [0, 0.5), got {self.margin}")
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


@dataclass
class CutoutResult:
    """One image's outcome; stays in the process (the caller writes the bytes, never XCom).

    ``stem``: output name (may hold ``/`` for images in sub-folders); ``source_url``;
    ``width``/``height``: the photo's size after EXIF orientation; ``cutout_png``,
    ``composite_jpeg``, ``mask_png``: encoded outputs (None when not made or on error);
    ``probability``: float32 map at the photo's size when ``keep_probability``;
    ``source_bytes``: the input file when ``keep_source``; ``quality``;
    ``error``: why the image failed (None when it worked); ``seconds``: from the start of its
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
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the image produced outputs."""
        return self.error is None

    @property
    def score(self) -> float | None:
        """The quality score, or None on error."""
        return None if self.quality is None else self.quality.score

    def summary(self) -> dict[str, Any]:
        """A small JSON-ready dict (stem, source, size, score and its parts, error): no pixels."""
        return {"stem": self.stem, "source_url": self.source_url, "width": self.width, "height": self.height,
                "score": self.score, "quality": None if self.quality is None else self.quality.to_dict(),
                "error": self.error, "seconds": round(self.seconds, 4)}


# ----------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------

class Engine(ABC):
    """A model that maps a preprocessed batch to probabilities.

    Attributes: ``input_size`` (S), ``resize`` (``"stretch"``/``"letterbox"``), ``mean``/``std``
    (the normalisation, RGB), ``backend`` (``"onnx"``/``"torch"``), ``device``, ``source`` and
    ``model_dir`` (the local folder the model came from, or None).
    """

    input_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    backend: str
    device: str = "cpu"
    source: str = ""
    model_dir: str | None = None

    @abstractmethod
    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Take float32 ``B×3×S×S``; return ``(B×S×S fused probabilities, B×6×S×S side
        probabilities or None)``."""

    def describe(self) -> str:
        """One line: backend, device, input size and source."""
        return f"{self.backend} on {self.device}, {self.input_size} px {self.resize}, {self.source}"


class OnnxEngine(Engine):
    """ONNX Runtime on the CPU, tuned for throughput: intra-op threads = ``threads`` (default:
    the usable cores), no spin-waiting (the decode/encode threads share the cores), sequential
    execution, all graph optimisations.

    How to feed the file and read it comes from the file (:func:`tasks.model.export.read_onnx_metadata`):
    input size and normalisation, a fixed batch size (rembg's files take one image: a batch is
    run image by image), the side outputs (this project's ``sides``, or the six extra outputs of
    a U2-Net file) and whether output 0 is a probability or a logit."""

    backend = "onnx"

    def __init__(self, onnx_path: str, threads: int | None = None, source: str | None = None) -> None:
        import onnxruntime as ort

        from tasks.model.export import read_onnx_metadata

        meta = read_onnx_metadata(onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or _cores())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self._outputs = [self.session.get_outputs()[0].name, *meta["side_outputs"]]
        self._fixed_batch = meta["batch"]
        self._logits = not meta["probabilities"]
        self.input_size, self.resize = int(meta["input_size"]), str(meta["resize"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.source = source or onnx_path
        self.model_dir = os.path.dirname(os.path.abspath(onnx_path))

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        if self._fixed_batch is None or len(batch) == self._fixed_batch:
            return self.session.run(self._outputs, {self._input: batch})
        if self._fixed_batch != 1:
            raise ValueError(f"{self.source} takes batches of exactly {self._fixed_batch} images, got {len(batch)}")
        parts = [self.session.run(self._outputs, {self._input: batch[i:i + 1]}) for i in range(len(batch))]
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        if self._logits:
            out = [1.0 / (1.0 + np.exp(-np.clip(o, -80.0, 80.0))) for o in out]
        fused = out[0][:, 0]
        if len(out) == 1:
            return fused, None
        sides = out[1] if len(out) == 2 else np.concatenate([o[:, :1] for o in out[1:]], axis=1)
        return fused, sides


class TorchEngine(Engine):
    """PyTorch (``model.pt`` + ``config.json``, :func:`tasks.model.io.load_model`) on ``device``."""

    backend = "torch"

    def __init__(self, model_url: str, device: str = "cpu", storage_options: dict | None = None,
                 source: str | None = None) -> None:
        import torch

        from tasks.model.io import load_model

        model, meta = load_model(model_url, storage_options=storage_options)
        self._torch = torch
        self.device = device
        self.model = model.to(device)
        self.input_size, self.resize = int(meta["input_size"]), str(meta["resize"])
        self.mean, self.std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        self.source = source or model_url
        self.model_dir = _local_dir(meta["model_url"])

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            out = self.model(x)
        fused = out.fused if hasattr(out, "fused") else out[0] if isinstance(out, (tuple, list)) else out
        probs = torch.sigmoid(fused.float())[:, 0].cpu().numpy()
        sides = getattr(out, "sides", None)
        side_probs = torch.sigmoid(torch.cat([s[:, :1].float() for s in sides], 1)).cpu().numpy() if sides else None
        return probs, side_probs


class FlipAveragedEngine(Engine):
    """Test-time flip around another engine: each batch is run as it is and mirrored, and the
    fused and side probabilities are averaged in logit space after mirroring back. Twice the
    model time; measured on real photos (``benchmarks/quality_real.py --flip``) it adds about
    half a point of mean IoU on photos of people and nothing on packshots on white."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.input_size, self.resize, self.mean, self.std = engine.input_size, engine.resize, engine.mean, engine.std
        self.backend, self.device, self.source, self.model_dir = (engine.backend, engine.device, engine.source,
                                                                  engine.model_dir)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probs, sides = self.engine.predict(batch)
        mirrored_probs, mirrored_sides = self.engine.predict(np.ascontiguousarray(batch[..., ::-1]))
        fused = _mean_in_logits(probs, mirrored_probs[..., ::-1])
        if sides is None or mirrored_sides is None:
            return fused, None
        return fused, _mean_in_logits(sides, mirrored_sides[..., ::-1])

    def describe(self) -> str:
        """The wrapped engine's line, marked as flip-averaged."""
        return f"{self.engine.describe()}, test-time flip"


def _mean_in_logits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    eps = 1e-6
    a = np.clip(a.astype(np.float64), eps, 1 - eps)
    b = np.clip(b.astype(np.float64), eps, 1 - eps)
    logit = (np.log(a / (1 - a)) + np.log(b / (1 - b))) / 2
    return (1 / (1 + np.exp(-logit))).astype(np.float32)


def _local_dir(url: str) -> str | None:
    return os.path.dirname(os.path.abspath(url)) if "://" not in url else None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def load_engine(source: str, storage_options: dict | None = None, device: str = "auto",
                backend: str = "auto", threads: int | None = None) -> Engine:
    """Open a model for inference.

    Args:
        source: ``"pretrained"`` (the published U2-NetP weights, :mod:`tasks.model.pretrained`); a
            ``.onnx`` file (this project's export, or any U2-Net-family file rembg runs); a folder or URL holding ``model.onnx`` and/or ``model.pt`` +
            ``config.json``; a ``model.pt``; or ``models:/<name>@<alias>`` /
            ``models:/<name>/<version>`` (downloaded with ``tasks.registry.download_model``).
        storage_options: fsspec options for ``s3://`` sources.
        device: ``"auto"`` (CUDA when a GPU is present and ``model.pt`` exists, else CPU),
            ``"cpu"`` or ``"cuda"``.
        backend: ``"auto"`` (ONNX Runtime on the CPU when ``model.onnx`` exists, PyTorch
            otherwise), ``"onnx"`` or ``"torch"``.
        threads: ONNX Runtime intra-op threads (default: the usable cores).

    Returns an :class:`Engine`. Raises ``FileNotFoundError`` when the source holds no model and
    ``ValueError`` for an impossible combination (e.g. ``backend="onnx"`` with ``device="cuda"``).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"backend must be auto, onnx or torch, got {backend!r}")
    if device == "cuda" and backend == "onnx":
        raise ValueError("the ONNX engine runs on the CPU; use backend='torch' (or 'auto') for CUDA")
    if device == "cuda" and not _cuda_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU")
    original = source
    if source == PRETRAINED:
        source = str(require_pretrained_onnx())
        original = f"{PRETRAINED} ({source})"
    if source.startswith("models:/"):
        from tasks import registry  # written alongside; imported only for registry URIs

        source = registry.download_model(source, tempfile.mkdtemp(prefix="bgremoval-model-"))
        storage_options = None
    onnx_url = pt_url = None
    if source.endswith(".onnx"):
        onnx_url = source
    elif source.endswith(".pt"):
        pt_url = source
    else:
        for name in ("model.onnx", "model.pt"):
            url = storage.join(source, name)
            if storage.exists(url, storage_options):
                onnx_url, pt_url = (url, pt_url) if name == "model.onnx" else (onnx_url, url)
    if onnx_url and not storage.exists(onnx_url, storage_options):
        raise FileNotFoundError(f"no ONNX model at {onnx_url}")
    if not onnx_url and not pt_url:
        raise FileNotFoundError(f"no model.onnx or model.pt at {source}")
    gpu = device == "cuda" or (device == "auto" and backend != "onnx" and pt_url is not None and _cuda_available())
    use_torch = backend == "torch" or gpu or (backend == "auto" and onnx_url is None)
    if use_torch:
        if pt_url is None:
            raise FileNotFoundError(f"the PyTorch engine needs model.pt + config.json; {source} has only {onnx_url}")
        return TorchEngine(pt_url, "cuda" if gpu else "cpu", storage_options, source=original)
    if onnx_url is None:
        raise FileNotFoundError(f"no model.onnx at {source} (backend='onnx')")
    return OnnxEngine(_local_copy(onnx_url, storage_options), threads=threads, source=original)


def default_model(registered_name: str = "bgremoval-u2net") -> tuple[str, str]:
    """The model ``bgremoval remove`` uses when none is named: the registered model's champion
    when an MLflow registry is configured (``MLFLOW_TRACKING_URI``) and has one, otherwise the
    published U2-NetP weights.

    Returns ``(source for load_engine, a sentence saying which and why)``. Raises
    ``FileNotFoundError`` saying how to get a model when there is neither.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    why = "no MLflow registry is configured (MLFLOW_TRACKING_URI)"
    if uri:
        from tasks import registry

        try:
            version = registry.alias_version(registered_name, registry.CHAMPION, tracking_uri=uri)
        except Exception as exc:  # noqa: BLE001 - an unreachable or empty registry means: no champion
            version, why = None, f"the registry at {uri} gave no champion ({type(exc).__name__}: {str(exc)[:120]})"
        else:
            why = f"{registered_name!r} has no champion at {uri}"
        if version is not None:
            return (registry.model_uri(registered_name, registry.CHAMPION),
                    f"the champion of {registered_name!r} (version {version}) from {uri}")
    path = find_pretrained_onnx() or require_pretrained_onnx()  # the latter raises, saying how to get the file
    return str(path), f"the published U2-NetP weights, not fine-tuned ({why}): {path}"


#: ``audit_model`` values that turn the mask audit's model check off.
NO_AUDIT_MODEL = ("", "none")


def audit_engine(reference: str, registered_name: str = "bgremoval-u2net",
                 storage_options: dict | None = None) -> tuple[Engine | None, str]:
    """The model whose predictions the mask audit compares masks with (``model_disagrees``).

    ``reference``: ``"auto"`` (what :func:`default_model` picks: the champion, else the published
    weights; no check when neither is there), ``"champion"``, ``"pretrained"``, ``"none"``/``""``
    (no check), or anything :func:`load_engine` takes. Returns ``(engine or None, a sentence saying
    which and why)``. An explicitly named model that cannot be loaded raises.
    """
    reference = (reference or "").strip()
    if reference.lower() in NO_AUDIT_MODEL:
        return None, "no model check (audit_model=none)"
    if reference == "auto":
        try:
            source, why = default_model(registered_name)
        except FileNotFoundError:
            return None, "no model check: no champion and no published weights on this machine"
    elif reference == "champion":
        from tasks import registry

        source, why = registry.model_uri(registered_name, registry.CHAMPION), f"the champion of {registered_name!r}"
    else:
        source, why = reference, reference
    return load_engine(source, storage_options), why


def _local_copy(url: str, storage_options: dict | None) -> str:
    """A local path for ``url`` (ONNX Runtime reads files): the path itself, or a temp copy."""
    fs, path = storage.filesystem(url, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return path
    local = os.path.join(tempfile.mkdtemp(prefix="bgremoval-onnx-"), posixpath.basename(path))
    with open(local, "wb") as fh:
        fh.write(storage.read_bytes(url, storage_options))
    return local


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

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


def _png_params(level: int) -> list[int]:
    """zlib ``level`` and the "up" row filter: on cut-outs as small as adaptive filtering and
    about twice as fast to encode (OpenCV ≥ 4.10 has the flag; older builds use their default)."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(level)]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    return params


def _render(rgb: np.ndarray, prob: np.ndarray, config: InferenceConfig) -> dict[str, bytes]:
    """Encode the outputs of one image from its RGB pixels and full-size probability map."""
    alpha = cv2.convertScaleAbs(prob, alpha=255.0)  # rounds and saturates to uint8
    png = _png_params(config.png_compression)
    out: dict[str, bytes] = {}
    if config.mask:
        out["mask_png"] = encode(".png", alpha, png)
    if config.canvas is not None:
        rgb, alpha = _on_canvas(rgb, alpha, config)
    weight = alpha.astype(np.float32) * np.float32(1 / 255)
    r, g, b = parse_background(config.background)
    backdrop = np.empty_like(rgb)
    backdrop[...] = (b, g, r)
    bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    bgr = bgra[..., :3]
    composite = cv2.blendLinear(np.ascontiguousarray(bgr), backdrop, weight, 1.0 - weight)
    out["composite_jpeg"] = encode(".jpg", composite, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
    bgra[..., 3] = alpha
    bgra = cv2.bitwise_and(bgra, bgra, mask=alpha)  # transparent pixels carry no colour: smaller files
    out["cutout_png"] = encode(".png", bgra, png)
    return out


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


def _options_for(url: str, storage_options: dict | None) -> dict | None:
    """``storage_options`` for remote URLs, None for local paths (fsspec's local filesystem
    takes no s3 options)."""
    return storage_options if "://" in url and not url.startswith("file://") else None


def _load(item: tuple[str, str], engine: Engine, storage_options: dict | None) -> _Loaded:
    url, stem = item
    started = time.perf_counter()
    loaded = _Loaded(CutoutResult(stem=stem, source_url=url), started)
    try:
        try:
            data = storage.read_bytes(url, _options_for(url, storage_options))
        except (OSError, FileNotFoundError) as exc:
            raise ValueError(f"cannot read: {exc}") from None
        loaded.data = data
        rgb = decode_image(data)
        loaded.rgb = rgb
        loaded.result.height, loaded.result.width = rgb.shape[:2]
        loaded.tensor = prepare_input(rgb, engine.input_size, engine.resize, engine.mean, engine.std)
    except (ValueError, cv2.error) as exc:
        loaded.result.error = str(exc)
    return loaded


def probability_map(engine: Engine, image_rgb: np.ndarray) -> np.ndarray:
    """The model's foreground probability for one RGB ``uint8`` photo, at the photo's size
    (float32 ``H×W`` in [0, 1]): what :func:`remove_backgrounds` cuts out with."""
    height, width = image_rgb.shape[:2]
    tensor = prepare_input(image_rgb, engine.input_size, engine.resize, engine.mean, engine.std)
    prob_s, _ = _unletterboxed(engine.predict(tensor[None])[0][0], None, engine, height, width)
    return resize_to_original(np.ascontiguousarray(prob_s, dtype=np.float32), (width, height))


def _unletterboxed(prob_s: np.ndarray, sides: np.ndarray | None, engine: Engine, height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The network-size maps cropped to the photo's box (letterbox) and cleaned to [0, 1]."""
    if engine.resize == "letterbox":
        x0, y0, new_w, new_h = letterbox_box(height, width, engine.input_size)
        prob_s = prob_s[y0:y0 + new_h, x0:x0 + new_w]
        sides = None if sides is None else sides[:, y0:y0 + new_h, x0:x0 + new_w]
    return np.clip(np.nan_to_num(prob_s, nan=0.0), 0.0, 1.0), sides


def _finish(loaded: _Loaded, prob_s: np.ndarray, sides: np.ndarray | None, engine: Engine,
            config: InferenceConfig) -> CutoutResult:
    result = loaded.result
    try:
        assert loaded.rgb is not None
        height, width = loaded.rgb.shape[:2]
        prob_s, sides = _unletterboxed(prob_s, sides, engine, height, width)
        result.quality = quality_score(prob_s, sides, config.quality)
        prob = resize_to_original(np.ascontiguousarray(prob_s, dtype=np.float32), (width, height))
        for key, value in _render(loaded.rgb, prob, config).items():
            setattr(result, key, value)
        if config.keep_probability:
            result.probability = prob
        if config.keep_source:
            result.source_bytes = loaded.data
    except (ValueError, cv2.error) as exc:
        result.error = f"cannot produce outputs: {exc}"
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
    threads = config.io_threads or _cores()
    batch_size = config.batch_size
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bgremoval-io") as pool:
        loads: deque[Future[_Loaded]] = deque()
        finishing: deque[Future[CutoutResult] | CutoutResult] = deque()

        def top_up() -> None:
            while len(loads) < 2 * batch_size:
                item = next(items, None)
                if item is None:
                    return
                loads.append(pool.submit(_load, item, engine, storage_options))

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


def remove_backgrounds(urls: Iterable[str | tuple[str, str]], engine: Engine,
                       options: InferenceConfig = InferenceConfig(),
                       storage_options: dict | None = None) -> list[CutoutResult]:
    """:func:`iter_remove_backgrounds` collected into a list (one result per input, in order).
    Each result keeps its encoded bytes: for large shards prefer the iterator and write as you go."""
    return list(iter_remove_backgrounds(urls, engine, options, storage_options))


def output_urls(stem: str, out_url: str, mask_dir: str = "masks") -> dict[str, str]:
    """Where :func:`write_outputs` puts an image's files: ``<out>/<stem>.png`` (cut-out),
    ``<out>/<stem>.jpg`` (on the background), ``<out>/<mask_dir>/<stem>.png`` (mask)."""
    return {"cutout_png": storage.join(out_url, f"{stem}.png"),
            "composite_jpeg": storage.join(out_url, f"{stem}.jpg"),
            "mask_png": storage.join(out_url, mask_dir, f"{stem}.png")}


def write_outputs(result: CutoutResult, out_url: str, storage_options: dict | None = None,
                  mask_dir: str = "masks") -> dict[str, str]:
    """Write a result's encoded outputs atomically under ``out_url`` (see :func:`output_urls`).
    Returns ``{output name: URL}`` of the files written (empty for a failed image). Raises
    ``ValueError`` when an output would overwrite the result's own input."""
    written: dict[str, str] = {}
    if not result.ok:
        return written
    for key, url in output_urls(result.stem, out_url, mask_dir).items():
        data = getattr(result, key)
        if data is None:
            continue
        if _same_path(url, result.source_url):
            raise ValueError(f"refusing to overwrite the input {result.source_url} with an output")
        written[key] = storage.write_bytes(url, data, _options_for(url, storage_options))
    return written


def _same_path(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


# ----------------------------------------------------------------------------------------------
# Listing inputs
# ----------------------------------------------------------------------------------------------

def list_images(inputs: Sequence[str], storage_options: dict | None = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[tuple[str, str]], list[str]]:
    """Expand files, folders and ``s3://`` prefixes into ``(url, stem)`` pairs.

    A file or object is taken whatever its extension; a folder or prefix contributes the files
    below it (recursively) with an image extension, the stem being the path relative to it
    without extension. Returns ``(items, problems)``: ``problems`` lists inputs that do not exist
    and names two inputs would share (the later one is left out).
    """
    items: list[tuple[str, str]] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    allowed = tuple(e.lower() for e in extensions)

    def add(url: str, stem: str) -> None:
        if stem in seen:
            problems.append(f"{url}: skipped, its output name {stem!r} is taken by {seen[stem]}")
            return
        seen[stem] = url
        items.append((url, stem))

    for entry in inputs:
        options = _options_for(entry, storage_options)
        fs, path = storage.filesystem(entry, options)
        if fs.isfile(path):
            add(entry, _stem_of(entry))
            continue
        listed = [o for o in storage.list_objects(entry, options)
                  if posixpath.splitext(o.relpath)[1].lower() in allowed]
        if not listed and not fs.exists(path):
            problems.append(f"{entry}: no such file, folder or prefix")
        for obj in listed:
            add(obj.url, posixpath.splitext(obj.relpath)[0])
    return items, problems


def results_line(result: CutoutResult, written: dict[str, str] | None = None) -> str:
    """One JSON line for a results log: :meth:`CutoutResult.summary` plus the files written."""
    return json.dumps({**result.summary(), "outputs": written or {}})




def remove_to(inputs: Sequence[str], out_url: str, engine: Engine, config: InferenceConfig = InferenceConfig(),
              storage_options: dict | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What ``bgremoval remove`` does: list ``inputs`` (:func:`list_images`), remove the
    backgrounds (:func:`iter_remove_backgrounds`) with a tqdm progress bar, write each result's
    files under ``out_url`` as it comes (:func:`write_outputs`) and a ``results.jsonl`` line per
    image, and report every failure through ``log`` (default: a line on stderr that keeps the
    progress bar intact). ``storage_options`` apply to remote URLs.

    Returns ``{"images", "ok", "failed", "problems", "seconds", "images_per_s", "out_url",
    "results_url"}``.
    """
    import sys

    from tqdm import tqdm

    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    items, problems = list_images(inputs, storage_options)
    for problem in problems:
        log(f"skipped: {problem}")
    started = time.perf_counter()
    ok, failed, lines = 0, 0, []
    results = iter_remove_backgrounds(items, engine, config, storage_options)
    for result in tqdm(results, total=len(items), desc="removing backgrounds", unit="img", disable=not progress):
        written: dict[str, str] = {}
        if result.ok:
            try:
                written = write_outputs(result, out_url, storage_options)
            except (OSError, ValueError) as exc:
                result.error = f"cannot write outputs: {exc}"
        if result.ok:
            ok += 1
        else:
            failed += 1
            log(f"failed: {result.source_url}: {result.error}")
        lines.append(results_line(result, written))
    seconds = time.perf_counter() - started
    results_url = storage.join(out_url, "results.jsonl")
    if lines:
        storage.write_text(results_url, "\n".join(lines) + "\n", _options_for(out_url, storage_options))
    return {"images": len(items), "ok": ok, "failed": failed, "problems": problems, "seconds": round(seconds, 3),
            "images_per_s": round(len(items) / seconds, 3) if seconds > 0 and items else 0.0,
            "out_url": out_url, "results_url": results_url if lines else None}
