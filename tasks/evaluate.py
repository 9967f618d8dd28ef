"""Evaluate a trained model: load ``model.pt``, predict probability maps, score labelled pairs.

The model is read as the training loop writes it (:mod:`tasks.train.loop`): ``model.pt`` holds
the bare state dict, and ``config.json`` next to it (or the ``config`` entry of
``result.json``) names the model, its optional ``model_widths``, the ``input_size`` and the
``resize`` mode. Preprocessing is the training one (:class:`tasks.train.data.SegmentationDataset`):
RGB scaled to [0, 1], normalised with the ImageNet mean/std, then resized to the square input
(``"stretch"``, or ``"letterbox"`` when the run trained that way). The fused logits go through a
sigmoid and are resized back to the image's own size with
:func:`tasks.metrics.resize_to_original`, so every measure is taken at the original resolution.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from tasks import storage
from tasks.metrics import ImageScore, boundary_f, iou, mae, resize_to_original, summarise
from tasks.model import MODEL_NAMES, TRAINING_SIZE, StageWidths, U2Net, U2NetConfig, build_model
from tasks.train.checkpoint import load_state_dict_from_url
from tasks.train.data import (
    DEFAULT_CLUSTER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    letterbox_box,
    load_samples,
    training_resize,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "decode_image",
    "decode_mask",
    "evaluate_dataset",
    "evaluate_folder",
    "evaluate_pairs",
    "FlipAveraged",
    "load_model",
    "predict_batch",
    "predict_probabilities",
    "preprocess",
    "score_dataset",
    "score_split",
]

#: Image file extensions :func:`evaluate_folder` pairs with masks (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

_RESIZE_MODES = ("stretch", "letterbox")


# ----------------------------------------------------------------------------------------------
# Loading the model
# ----------------------------------------------------------------------------------------------

def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def _read_run_config(folder: str, storage_options: dict | None) -> tuple[dict[str, Any], str]:
    """The training config saved next to ``model.pt``: ``config.json``, else ``result.json``'s
    ``config`` entry, else ``{}``; returns it with the name of the file it came from."""
    config_url = storage.join(folder, "config.json")
    if storage.exists(config_url, storage_options):
        return json.loads(storage.read_bytes(config_url, storage_options)), "config.json"
    result_url = storage.join(folder, "result.json")
    if storage.exists(result_url, storage_options):
        result = json.loads(storage.read_bytes(result_url, storage_options))
        if isinstance(result.get("config"), Mapping) and result["config"]:
            return dict(result["config"]), "result.json"
    return {}, "none"


def _widths_config(widths: Mapping[str, Sequence[Sequence[int]]]) -> U2NetConfig:
    try:
        encoder = tuple(StageWidths(int(m), int(o)) for m, o in widths["encoder"])
        decoder = tuple(StageWidths(int(m), int(o)) for m, o in widths["decoder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("model_widths must be {'encoder': [[mid, out]] * 6, 'decoder': [[mid, out]] * 5}, "
                         f"got {widths!r}") from exc
    return U2NetConfig(encoder=encoder, decoder=decoder)


def _fits(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)


class OnnxModule(nn.Module):
    """An exported ONNX file (:mod:`tasks.export`) behind the ``nn.Module`` interface evaluation
    uses: ``forward`` runs ONNX Runtime on the CPU and returns logits ``B×1×S×S`` (the logit of
    the exported probabilities), so an exported model is scored exactly like a PyTorch one."""

    def __init__(self, onnx_path: str) -> None:
        super().__init__()
        from tasks.inference import OnnxEngine

        self.engine = OnnxEngine(onnx_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, _ = self.engine.predict(x.detach().cpu().float().numpy())
        return torch.logit(torch.from_numpy(np.clip(probs, 1e-7, 1 - 1e-7)))[:, None]


class FlipAveraged(nn.Module):
    """Test-time flip: the mean of a model's fused logits on the input and on its horizontal
    mirror (mirrored back). Wraps anything :func:`predict_batch` accepts and costs two forward
    passes per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = _fused(self.model(torch.cat([x, x.flip(-1)])))
        plain, mirrored = logits.chunk(2)
        return (plain + mirrored.flip(-1)) / 2


def _load_onnx(model_url: str, storage_options: dict | None) -> tuple[nn.Module, dict[str, Any]]:
    import tempfile

    from tasks.export import read_onnx_metadata

    with tempfile.TemporaryDirectory(prefix="bgremoval-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(model_url, storage_options))
        meta = read_onnx_metadata(path)
        module = OnnxModule(path)  # the session holds the model in memory; the file may go
    return module.eval(), {"model": meta["model"] or None, "model_widths": None, "input_size": meta["input_size"],
                           "resize": meta["resize"], "model_url": model_url, "config_source": "onnx metadata"}


def load_model(model_url: str, model_name: str | None = None,
               storage_options: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model for inference.

    Args:
        model_url: a ``model.pt`` written by :func:`tasks.train.loop.train` (a bare state dict; a
            training checkpoint or ``{"state_dict": ...}`` file works too), the run folder
            holding it, or an exported ``.onnx`` file (run by ONNX Runtime, see
            :class:`OnnxModule`).
        model_name: ``"u2net"``/``"u2netp"``; overrides the name in the run's config. Channel
            widths saved in the config (``model_widths``) still take precedence, as in training.
            Without a name from either source the architecture whose parameter shapes match
            the state dict is used.
        storage_options: fsspec options for ``model_url``.

    Returns ``(model, metadata)``: the model in eval mode on the CPU, and a dict with ``model``
    (name), ``model_widths`` (or None), ``input_size`` (the config's, else 320), ``resize``
    (``"stretch"`` or ``"letterbox"``), ``model_url`` and ``config_source`` (``"config.json"``,
    ``"result.json"`` or ``"none"``). Raises ``FileNotFoundError`` when there is no model file and
    ``ValueError`` when the weights fit no architecture or the named one.
    """
    if model_url.lower().endswith(".onnx"):
        if not storage.exists(model_url, storage_options):
            raise FileNotFoundError(f"no ONNX file at {model_url}")
        return _load_onnx(model_url, storage_options)
    candidate = storage.join(model_url, "model.pt")
    if storage.exists(candidate, storage_options):  # model_url is the run folder
        model_url = candidate
    if not storage.exists(model_url, storage_options):
        raise FileNotFoundError(f"no model at {model_url}: pass a model.pt written by training or its run folder")
    state = load_state_dict_from_url(model_url, storage_options)
    config, source = _read_run_config(_parent(model_url), storage_options)
    widths = config.get("model_widths")
    name = model_name or config.get("model")
    if widths:
        model: nn.Module = U2Net(_widths_config(widths))
    elif name:
        model = build_model(name)
    else:
        matches = [n for n in MODEL_NAMES if _fits(build_model(n), state)]
        if not matches:
            raise ValueError(f"the weights at {model_url} fit none of {', '.join(MODEL_NAMES)} and no config.json "
                             "names the model: pass model_name")
        name = matches[0]
        model = build_model(name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the weights at {model_url} do not fit model {name!r} "
                         f"(widths {widths!r}): {str(exc).splitlines()[0]}") from exc
    model.eval()
    resize = str(config.get("resize") or "stretch")
    if resize not in _RESIZE_MODES:
        raise ValueError(f"{source} at {_parent(model_url)} has resize {resize!r}; expected one of {_RESIZE_MODES}")
    metadata = {
        "model": "".join(c for c in str(name).lower() if c not in "-_ ") if name else None,
        "model_widths": widths or None,
        "input_size": int(config.get("input_size") or TRAINING_SIZE),
        "resize": resize,
        "model_url": model_url,
        "config_source": source,
    }
    return model, metadata


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------

def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be a non-empty H×W×3 RGB array, got shape {image.shape}")
    return image


def preprocess(image_rgb: np.ndarray, input_size: int, resize: str = "stretch") -> np.ndarray:
    """Turn an ``H×W×3`` RGB ``uint8`` image into the network input exactly as training does.

    Scales to [0, 1] (``uint8`` divided by 255; float images are taken as already in [0, 1]),
    normalises with the ImageNet mean/std and resizes to ``input_size`` square (``"stretch"``, or
    ``"letterbox"``: longer side to ``input_size``, centred, zero padding). Returns float32
    ``3×S×S``. Raises ``ValueError`` for a non-RGB array or an unknown ``resize``.
    """
    if resize not in _RESIZE_MODES:
        raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {resize!r}")
    image = _check_image(image_rgb)
    scaled = image.astype(np.float32) * np.float32(1 / 255) if image.dtype == np.uint8 else image.astype(np.float32)
    normed = (scaled - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    size = int(input_size)
    if resize == "stretch":
        out = training_resize(normed, size, size)
    else:
        x0, y0, new_w, new_h = letterbox_box(image.shape[0], image.shape[1], size)
        out = np.zeros((size, size, 3), np.float32)
        out[y0:y0 + new_h, x0:x0 + new_w] = training_resize(normed, new_w, new_h)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _fused(output: Any) -> torch.Tensor:
    if hasattr(output, "fused"):
        return output.fused
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def predict_batch(model: nn.Module, images_rgb: Sequence[np.ndarray], input_size: int,
                  resize: str = "stretch",
                  output_sizes: Sequence[tuple[int, int] | None] | None = None) -> list[np.ndarray]:
    """Predict foreground probabilities for several RGB images in one forward pass.

    Each image is preprocessed by :func:`preprocess`; the model (called on the device of its
    parameters, under ``torch.inference_mode``) must return logits B×1×S×S, a ``U2NetOutput`` or
    anything with a ``.fused`` attribute, or a tuple whose first item is the fused logits.
    Returns one float32 map in [0, 1] per image, at that image's own size, or at
    ``output_sizes[i] = (width, height)`` where given (one resize from the network output, e.g.
    to a full-resolution mask's size).
    """
    if len(images_rgb) == 0:
        return []
    images = [_check_image(im) for im in images_rgb]
    sizes = list(output_sizes) if output_sizes is not None else [None] * len(images)
    if len(sizes) != len(images):
        raise ValueError(f"output_sizes has {len(sizes)} entries for {len(images)} images")
    batch = torch.from_numpy(np.stack([preprocess(im, input_size, resize) for im in images]))
    param = next(iter(model.parameters()), None)
    if param is not None:
        batch = batch.to(param.device)
    with torch.inference_mode():
        logits = _fused(model(batch))
    probs = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    out = []
    for prob, image, size in zip(probs, images, sizes):
        height, width = image.shape[:2]
        if resize == "letterbox":
            x0, y0, new_w, new_h = letterbox_box(height, width, int(input_size))
            prob = prob[y0:y0 + new_h, x0:x0 + new_w]
        out.append(resize_to_original(np.ascontiguousarray(prob, dtype=np.float32), size or (width, height)))
    return out


def predict_probabilities(model: nn.Module, image_rgb: np.ndarray, input_size: int,
                          resize: str = "stretch", output_size: tuple[int, int] | None = None) -> np.ndarray:
    """Predict the foreground probability of one ``H×W×3`` RGB image.

    Preprocesses like training (:func:`preprocess`), applies the sigmoid to the fused logits and
    resizes the map back to the image's size (or to ``output_size = (width, height)``) with
    :func:`tasks.metrics.resize_to_original`. Returns float32 ``H×W`` in [0, 1].
    """
    return predict_batch(model, [image_rgb], input_size, resize, [output_size])[0]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def _mask_2d(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[..., 0]
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
    return m


def evaluate_pairs(model: nn.Module, pairs: Iterable[tuple[str, str | None, np.ndarray, np.ndarray]],
                   input_size: int, threshold: float = 0.5, resize: str = "stretch") -> list[ImageScore]:
    """Score the model on ``(stem, cluster, image_rgb, mask)`` pairs.

    The probability map is resized from the network output straight to the mask's size with
    :func:`tasks.metrics.resize_to_original`: the image's own size for a matching mask, the
    mask's resolution for e.g. a full-size mask of a downscaled image (one resize, and the truth
    is never resampled). The binary
    prediction is ``probability > threshold``; IoU and boundary F use it, MAE the probabilities.
    A null cluster counts as ``"all"``. Returns one :class:`ImageScore` per pair, in order.
    Raises ``ValueError`` for a threshold outside (0, 1) or a malformed image or mask.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    scores = []
    for stem, cluster, image, mask in pairs:
        truth = _mask_2d(mask)
        prob = predict_probabilities(model, image, input_size, resize, (truth.shape[1], truth.shape[0]))
        pred = prob > threshold
        scores.append(ImageScore(stem=str(stem), cluster=DEFAULT_CLUSTER if cluster is None else str(cluster),
                                 iou=iou(pred, truth), mae=mae(prob, truth), boundary_f=boundary_f(pred, truth)))
    return scores


def decode_image(url: str, storage_options: dict | None) -> np.ndarray:
    """Read and decode an image file into ``H×W×3`` RGB ``uint8``; ``ValueError`` when undecodable."""
    data = np.frombuffer(storage.read_bytes(url, storage_options), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image {url}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_mask(url: str, storage_options: dict | None) -> np.ndarray:
    """Read and decode a mask file into ``H×W`` ``uint8``; ``ValueError`` when undecodable."""
    data = np.frombuffer(storage.read_bytes(url, storage_options), np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot decode mask {url}")
    return mask


def score_split(model: nn.Module, meta: dict[str, Any], dataset_url: str, split: str = "test",
                storage_options: dict | None = None, threshold: float = 0.5,
                audit: str = "exclude") -> list[ImageScore]:
    """Score a loaded model (``(model, meta)`` from :func:`load_model`) on every ``status == "ok"``
    row of ``split`` of a dataset.

    Reads ``<dataset_url>/manifest.parquet`` (augmented samples are not evaluated; a null
    cluster counts as ``"all"``), loads each clean image/mask pair and scores it with
    :func:`evaluate_pairs` at the model's own ``input_size`` and resize mode. Returns one
    :class:`ImageScore` per pair. ``audit`` selects rows by the mask audit as
    :func:`tasks.train.data.load_samples` does (default: pairs with an unreviewed broken mask are
    left out). Raises ``ValueError`` when the split has no rows (except with ``audit="only"``,
    which may give none) and ``FileNotFoundError`` when the manifest is missing.
    """
    rows = load_samples(dataset_url, split, storage_options, include_augmented=False, audit=audit)
    if not rows and audit == "only":
        return []
    if not rows:
        raise ValueError(f"the manifest at {dataset_url} has no usable rows in split {split!r}")
    pairs = ((key, cluster, decode_image(image_url, storage_options), decode_mask(mask_url, storage_options))
             for key, image_url, mask_url, cluster in rows)
    return evaluate_pairs(model, pairs, meta["input_size"], threshold, meta["resize"])


def score_dataset(model_url: str, dataset_url: str, split: str = "test", storage_options: dict | None = None,
                  threshold: float = 0.5, model_name: str | None = None,
                  model_storage_options: dict | None = None) -> tuple[list[ImageScore], dict[str, Any]]:
    """Load the model at ``model_url`` (:func:`load_model`; ``model_storage_options`` for it when it
    lives elsewhere than the data, default ``storage_options``) and :func:`score_split` it.
    Returns ``(scores, model metadata)``; raises as those two do."""
    model_options = storage_options if model_storage_options is None else model_storage_options
    model, meta = load_model(model_url, model_name, model_options)
    return score_split(model, meta, dataset_url, split, storage_options, threshold), meta


def evaluate_dataset(model_url: str, dataset_url: str, split: str = "test", storage_options: dict | None = None,
                     threshold: float = 0.5, model_name: str | None = None) -> dict[str, Any]:
    """Evaluate the model at ``model_url`` on the ``status == "ok"`` rows of ``split`` of a dataset.

    Returns :func:`tasks.metrics.summarise` of :func:`score_dataset`'s scores plus ``split``,
    ``model_url``, ``dataset_url``, ``threshold`` and ``input_size``. Raises ``ValueError`` when
    the split has no rows and ``FileNotFoundError`` when the manifest or model is missing.
    """
    scores, meta = score_dataset(model_url, dataset_url, split, storage_options, threshold, model_name)
    summary = summarise(scores)
    summary.update(split=split, model_url=model_url, dataset_url=dataset_url, threshold=float(threshold),
                   input_size=meta["input_size"])
    return summary


def _by_stem(folder_url: str, extensions: tuple[str, ...], storage_options: dict | None,
             what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for obj in storage.list_objects(folder_url, storage_options):
        if "/" in obj.relpath:
            continue
        stem, ext = posixpath.splitext(obj.relpath)
        if ext.lower() not in extensions:
            continue
        if stem in found:
            raise ValueError(f"two {what} share the stem {stem!r} in {folder_url}: "
                             f"{posixpath.basename(found[stem])} and {obj.relpath}")
        found[stem] = obj.url
    return found


def evaluate_folder(model_url: str, images_dir_or_url: str, masks_dir_or_url: str,
                    storage_options: dict | None = None, threshold: float = 0.5,
                    model_name: str | None = None) -> dict[str, Any]:
    """Evaluate the model on any labelled folder: ``images/<stem>.{jpg,jpeg,png}`` with
    ``masks/<stem>.png``, paired by stem, all in cluster ``"all"``.

    Masks may be at another resolution than their images (e.g. the original full-size masks);
    each score is then measured at the mask's resolution (see :func:`evaluate_pairs`). Only the
    top level of each folder is read. Returns :func:`tasks.metrics.summarise` of the scores plus
    ``model_url``, ``images_url``, ``masks_url``, ``threshold``, ``input_size``, ``skipped`` (stems
    of images without a mask, sorted) and ``unmatched_masks`` (stems of masks without an image).
    Raises ``ValueError`` when no image has a mask or two images share a stem.
    """
    images = _by_stem(images_dir_or_url, IMAGE_EXTENSIONS, storage_options, "images")
    masks = _by_stem(masks_dir_or_url, (".png",), storage_options, "masks")
    stems = sorted(set(images) & set(masks))
    if not stems:
        raise ValueError(f"no image in {images_dir_or_url} has a mask <stem>.png in {masks_dir_or_url} "
                         f"({len(images)} images, {len(masks)} masks)")
    model, meta = load_model(model_url, model_name, storage_options)
    pairs = ((stem, DEFAULT_CLUSTER, decode_image(images[stem], storage_options),
              decode_mask(masks[stem], storage_options)) for stem in stems)
    scores = evaluate_pairs(model, pairs, meta["input_size"], threshold, meta["resize"])
    summary = summarise(scores)
    summary.update(model_url=model_url, images_url=images_dir_or_url, masks_url=masks_dir_or_url,
                   threshold=float(threshold), input_size=meta["input_size"],
                   skipped=sorted(set(images) - set(masks)), unmatched_masks=sorted(set(masks) - set(images)))
    return summary
