"""Evaluate a trained model: load ``model.pt``, predict probability maps, score labelled pairs.

The model is read as the training loop writes it (:mod:`tasks.train.loop`, loaded by
:mod:`tasks.model.io`): ``model.pt`` holds the bare state dict, and ``config.json`` next to it (or
the ``config`` entry of ``result.json``) names the model, its optional ``model_widths``, the
``input_size`` and the ``resize`` mode. Preprocessing is the training one (:mod:`tasks.model.preprocess`):
RGB scaled to [0, 1], normalised with the ImageNet mean/std, then resized to the square input
(``"stretch"``, or ``"letterbox"`` when the run trained that way). The fused logits go through a
sigmoid and are resized back to the image's own size with
:func:`tasks.model.preprocess.resize_to_original`, so every measure is taken at the original resolution.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.core import storage
from tasks.core.codecs import MASK_EXTENSIONS, read_image, read_mask
from tasks.core.errors import first_line
from tasks.core.heap import keep_freed_memory
from tasks.evaluation.metrics import MASK_THRESHOLD, ImageScore, boundary_f, iou, mae, summarise
from tasks.model.io import load_model as load_torch_model
from tasks.model.preprocess import check_image, letterbox_box, preprocess
from tasks.model.refine import RefineConfig, map_at_photo
from tasks.serving.pipeline import IMAGE_EXTENSIONS
from tasks.train.data import DEFAULT_CLUSTER, load_samples

__all__ = [
    "IMAGE_EXTENSIONS",
    "evaluate_dataset",
    "evaluate_folder",
    "evaluate_pairs",
    "load_model",
    "predict_batch",
    "predict_probabilities",
    "preprocess",
    "score_dataset",
    "score_split",
]



# ----------------------------------------------------------------------------------------------
# Loading the model
# ----------------------------------------------------------------------------------------------

def load_model(model_url: str, model_name: str | None = None,
               storage_options: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model for scoring: an exported ``.onnx`` file (run by ONNX Runtime, see
    :class:`tasks.serving.onnx_module.EngineModule`), else a ``model.pt`` or the run folder holding
    it (:func:`tasks.model.io.load_model`, whose arguments, metadata and errors this shares; the
    process then keeps freed memory in its heap, :func:`tasks.core.heap.keep_freed_memory`: 1.6-1.8×
    faster scoring on the CPU). Raises ``FileNotFoundError`` when there is no such file."""
    if model_url.lower().endswith(".onnx"):
        if not storage.exists(model_url, storage_options):
            raise FileNotFoundError(f"no ONNX file at {model_url}")
        from tasks.serving.onnx_module import load_onnx_module

        return load_onnx_module(model_url, storage_options)
    loaded = load_torch_model(model_url, model_name, storage_options)
    keep_freed_memory()
    return loaded


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------

def _fused(output: Any) -> torch.Tensor:
    if hasattr(output, "fused"):
        return output.fused
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def predict_batch(model: nn.Module, images_rgb: Sequence[np.ndarray], input_size: int,
                  resize: str = "stretch",
                  output_sizes: Sequence[tuple[int, int] | None] | None = None,
                  refine: RefineConfig | None = None) -> list[np.ndarray]:
    """Predict foreground probabilities for several RGB images in one forward pass.

    Each image is preprocessed by :func:`tasks.model.preprocess.preprocess`; the model (called on the device of its
    parameters, under ``torch.inference_mode``) must return logits B×1×S×S, a ``U2NetOutput`` or
    anything with a ``.fused`` attribute, or a tuple whose first item is the fused logits.
    Returns one float32 map in [0, 1] per image, at that image's own size, or at
    ``output_sizes[i] = (width, height)`` where given (one resize from the network output, e.g.
    to a full-resolution mask's size). With ``refine`` each map is refined on its image's edges
    as ``bgremoval remove`` publishes it (:func:`tasks.model.refine.refine_probability`; the image is
    resized to an ``output_sizes`` entry that differs from its own size).
    """
    if len(images_rgb) == 0:
        return []
    images = [check_image(im) for im in images_rgb]
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
        prob = np.ascontiguousarray(prob, dtype=np.float32)
        out.append(map_at_photo(prob, _as_uint8(image) if refine else image, int(input_size), refine, size))
    return out


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (which :func:`preprocess` also takes) as uint8, the refinement's guide."""
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def predict_probabilities(model: nn.Module, image_rgb: np.ndarray, input_size: int,
                          resize: str = "stretch", output_size: tuple[int, int] | None = None,
                          refine: RefineConfig | None = None) -> np.ndarray:
    """Predict the foreground probability of one ``H×W×3`` RGB image.

    Preprocesses like training (:func:`tasks.model.preprocess.preprocess`), applies the sigmoid to the fused logits and
    resizes the map back to the image's size (or to ``output_size = (width, height)``) with
    :func:`tasks.model.preprocess.resize_to_original` (refined on the photo with ``refine``, as in
    :func:`predict_batch`). Returns float32 ``H×W`` in [0, 1].
    """
    return predict_batch(model, [image_rgb], input_size, resize, [output_size], refine)[0]


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
                   input_size: int, threshold: float = MASK_THRESHOLD, resize: str = "stretch",
                   refine: RefineConfig | None = None) -> list[ImageScore]:
    """Score the model on ``(stem, cluster, image_rgb, mask)`` pairs.

    The probability map is resized from the network output straight to the mask's size with
    :func:`tasks.model.preprocess.resize_to_original`: the image's own size for a matching mask, the
    mask's resolution for e.g. a full-size mask of a downscaled image (one resize, and the truth
    is never resampled). The binary
    prediction is ``probability > threshold``; IoU and boundary F use it, MAE the probabilities.
    A null cluster counts as ``"all"``. ``refine`` scores the map refined on the photo, as
    ``bgremoval remove`` publishes it (the gate leaves it None: it judges the network's own map).
    Returns one :class:`ImageScore` per pair, in order.
    Raises ``ValueError`` for a threshold outside (0, 1) or a malformed image or mask.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    scores = []
    for stem, cluster, image, mask in pairs:
        truth = _mask_2d(mask)
        prob = predict_probabilities(model, image, input_size, resize, (truth.shape[1], truth.shape[0]), refine)
        pred = prob > threshold
        scores.append(ImageScore(stem=str(stem), cluster=DEFAULT_CLUSTER if cluster is None else str(cluster),
                                 iou=iou(pred, truth), mae=mae(prob, truth), boundary_f=boundary_f(pred, truth)))
    return scores


def score_split(model: nn.Module, meta: dict[str, Any], dataset_url: str, split: str = "test",
                storage_options: dict | None = None, threshold: float = MASK_THRESHOLD,
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
    pairs = ((key, cluster, read_image(image_url, storage_options), read_mask(mask_url, storage_options))
             for key, image_url, mask_url, cluster in rows)
    return evaluate_pairs(model, pairs, meta["input_size"], threshold, meta["resize"])


def score_dataset(model_url: str, dataset_url: str, split: str = "test", storage_options: dict | None = None,
                  threshold: float = MASK_THRESHOLD, model_name: str | None = None,
                  model_storage_options: dict | None = None) -> tuple[list[ImageScore], dict[str, Any]]:
    """Load the model at ``model_url`` (:func:`load_model`; ``model_storage_options`` for it when it
    lives elsewhere than the data, default ``storage_options``) and :func:`score_split` it.
    Returns ``(scores, model metadata)``; raises as those two do."""
    model_options = storage_options if model_storage_options is None else model_storage_options
    model, meta = load_model(model_url, model_name, model_options)
    return score_split(model, meta, dataset_url, split, storage_options, threshold), meta


def evaluate_dataset(model_url: str, dataset_url: str, split: str = "test", storage_options: dict | None = None,
                     threshold: float = MASK_THRESHOLD, model_name: str | None = None) -> dict[str, Any]:
    """Evaluate the model at ``model_url`` on the ``status == "ok"`` rows of ``split`` of a dataset.

    Returns :func:`tasks.evaluation.metrics.summarise` of :func:`score_dataset`'s scores plus ``split``,
    ``model_url``, ``dataset_url``, ``threshold`` and ``input_size``. Raises ``ValueError`` when
    the split has no rows and ``FileNotFoundError`` when the manifest or model is missing.
    """
    scores, meta = score_dataset(model_url, dataset_url, split, storage_options, threshold, model_name)
    summary = summarise(scores)
    summary.update(split=split, model_url=model_url, dataset_url=dataset_url, threshold=float(threshold),
                   input_size=meta["input_size"])
    return summary


def _by_stem(objects: Iterable[storage.ObjectInfo], folder_url: str, extensions: Iterable[str],
             what: str) -> dict[str, str]:
    """``{stem: url}`` of the top-level files among ``objects`` (a listing of ``folder_url``) with one
    of ``extensions``; ``ValueError`` when two share a stem."""
    found: dict[str, str] = {}
    for obj in objects:
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
                    storage_options: dict | None = None, threshold: float = MASK_THRESHOLD,
                    model_name: str | None = None, refine: RefineConfig | None = None) -> dict[str, Any]:
    """Evaluate the model on any labelled folder: ``images/<stem>.<ext>`` (the formats ``bgremoval
    remove`` reads, :data:`IMAGE_EXTENSIONS`) with ``masks/<stem>.png``, paired by stem, all in cluster
    ``"all"``.

    Masks may be at another resolution than their images (e.g. the original full-size masks);
    each score is then measured at the mask's resolution (see :func:`evaluate_pairs`). Only the
    top level of each folder is read. ``refine`` scores the maps refined on the photos, as ``bgremoval
    remove`` publishes them. Returns :func:`tasks.evaluation.metrics.summarise` of the scores plus
    ``model_url``, ``images_url``, ``masks_url``, ``threshold``, ``input_size``, ``refined``, ``skipped`` (stems
    of images without a mask, sorted), ``unmatched_masks`` (stems of masks without an image) and
    ``unreadable`` (``{"stem", "reason"}`` of the pairs whose image or mask could not be read or decoded,
    or whose mask is in another format than PNG: left out, the rest is scored). Raises ``ValueError``
    when no image has a PNG mask, none can be read, or two images share a stem.
    """
    images = _by_stem(storage.list_objects(images_dir_or_url, storage_options), images_dir_or_url,
                      IMAGE_EXTENSIONS, "images")
    mask_files = list(storage.list_objects(masks_dir_or_url, storage_options))
    masks = _by_stem(mask_files, masks_dir_or_url, MASK_EXTENSIONS, "masks")
    other_masks: dict[str, str] = {}  # an image's only mask, in another format: named, not scored
    for obj in mask_files:
        stem, ext = posixpath.splitext(obj.relpath)
        if "/" not in obj.relpath and ext.lower() in IMAGE_EXTENSIONS and stem in images and stem not in masks:
            other_masks.setdefault(stem, obj.url)
    stems = sorted(set(images) & set(masks))
    if not stems:
        raise ValueError(f"no image in {images_dir_or_url} has a mask <stem>.png in {masks_dir_or_url} "
                         f"({len(images)} images, {len(masks)} PNG masks"
                         + (f", {len(other_masks)} masks in other formats" if other_masks else "") + ")")
    model, meta = load_model(model_url, model_name, storage_options)
    unreadable = [{"stem": stem, "reason": f"mask {url} is not a PNG (masks are PNG only, as cleaning "
                                           f"takes them: a JPEG's blocks blur the edges the IoU measures)"}
                  for stem, url in sorted(other_masks.items())]
    pairs = _readable_pairs(stems, images, masks, storage_options, unreadable)
    scores = evaluate_pairs(model, pairs, meta["input_size"], threshold, meta["resize"], refine)
    if not scores:
        raise ValueError(f"none of the {len(stems)} pairs in {images_dir_or_url} could be read: "
                         f"{unreadable[0]['stem']}: {unreadable[0]['reason']}")
    summary = summarise(scores)
    summary.update(model_url=model_url, images_url=images_dir_or_url, masks_url=masks_dir_or_url,
                   threshold=float(threshold), input_size=meta["input_size"], refined=refine is not None,
                   skipped=sorted(set(images) - set(masks) - set(other_masks)),
                   unmatched_masks=sorted(set(masks) - set(images)),
                   unreadable=sorted(unreadable, key=lambda bad: bad["stem"]))
    return summary


def _readable_pairs(stems: Sequence[str], images: dict[str, str], masks: dict[str, str],
                    storage_options: dict | None,
                    unreadable: list[dict[str, str]]) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """The ``(stem, cluster, image, mask)`` pairs of :func:`evaluate_folder`; a pair whose image or mask
    cannot be read or decoded is left out and appended to ``unreadable`` with the reason."""
    for stem in stems:
        try:
            image = read_image(images[stem], storage_options)
            mask = read_mask(masks[stem], storage_options)
        except (OSError, ValueError) as exc:
            unreadable.append({"stem": stem, "reason": first_line(exc)[:300]})
            continue
        yield stem, DEFAULT_CLUSTER, image, mask
