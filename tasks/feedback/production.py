"""The production stage: cut out every photo of an ``incoming/<batch>/`` drop with the champion and
route each result by its quality score.

* score ≥ threshold → ``published/<batch>/<stem>.png`` (RGBA cut-out), ``published/<batch>/<stem>.jpg`` (on the
  background) and ``published/<batch>/masks/<stem>.png``, and the pair (photo, predicted mask) goes to
  the retraining pool (origin ``published``);
* score < threshold → ``corrections/queue/<batch>--<stem>/`` for a person (the correction page);
* an image that cannot be processed → ``production/<batch>/failed/<shard>.json`` with the reason.

Queue items and pool pairs record the photo's SHA-256 and the run. A photo that an earlier run of
the batch (a ``_READY`` written again) or an earlier try of the shard queued or published, with the
same bytes, is left alone before the model runs: a person's decision, the published cut-out and the
pool pair stay as they are, and no second queue item is made. Another run's photos are counted as
``earlier``; an earlier try's as this run's (published or queued), as if it had not been interrupted. The same name dropped again
with new content is processed under its own id (:func:`tasks.feedback.queue.photo_id`), the earlier
photo's item and pair kept.

Inputs are only read. The stage functions are :func:`plan_production` (list and shard the drop),
:func:`process_shard` (one mapped task) and :func:`summarise_production`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from tasks.core.heap import keep_freed_memory
from tasks.core.shards import check_shard_size, shard_ranges
from tasks.data.config import CleaningConfig
from tasks.core import layout, storage
from tasks.model.refine_choice import REFINE_MODES

log = logging.getLogger(__name__)

#: Photos one mapped task of the inference DAG cuts out (its ``photos_per_shard``).
PHOTOS_PER_SHARD = 200

__all__ = ["NoChampion", "ProductionConfig", "handled_before", "plan_production", "process_shard", "resolve_model", "resolve_threshold",
           "summarise_production"]


@dataclass(frozen=True)
class ProductionConfig:
    """How a drop is processed.

    ``threshold``: least quality score to publish (None: the champion's calibrated threshold,
    ``quality.json`` next to the model); ``background``: the JPEG's colour ``'#rrggbb'``;
    ``canvas``: ``"WxH"`` to crop products onto a fixed canvas with ``margin``; ``batch_size``:
    images per model call; ``review_max_side``: photos queued for correction are downscaled to
    this longer side for the page; ``refine``: the edge refinement (``auto``: the choice measured
    for the model, :func:`tasks.serving.engines.refinement_for`; ``on``; ``off``); ``min_side``: a
    photo with a shorter side fails instead (a thumbnail is no catalogue photo, and cleaning would
    quarantine its pair as ``image_too_small``).
    """

    threshold: float | None = None
    background: str = "#ffffff"
    canvas: str | None = None
    margin: float = 0.05
    batch_size: int = 4
    review_max_side: int = 2000
    refine: str = "auto"
    min_side: int = CleaningConfig.min_side
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {', '.join(REFINE_MODES)}, got {self.refine!r}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1] (a quality score), got {self.threshold!r}")


def plan_production(bucket_url: str, batch: str, shard_size: int = PHOTOS_PER_SHARD,
                    storage_options: dict | None = None, max_shards: int | None = None) -> dict[str, Any]:
    """List the images of ``incoming/<batch>/`` and write them as shard lists (of ``shard_size``
    photos, grown when more than ``max_shards`` shards would be needed:
    :func:`tasks.core.shards.shard_ranges`).

    Returns ``{"batch", "n_images", "shard_urls", "problems"}``; shard lists are JSON files
    ``production/<batch>/shards/<nnnn>.json`` of ``[url, stem]`` pairs. Raises ``ValueError``
    for a drop without images.
    """
    from tasks.serving.pipeline import list_images

    check_shard_size(shard_size, max_shards)
    incoming = layout.incoming(bucket_url, batch)
    items, problems = list_images([incoming], storage_options)
    if not items:
        raise ValueError(f"no images under {incoming}/ ({'; '.join(problems) or 'empty'})")
    shard_urls = []
    for number, (start, stop) in enumerate(shard_ranges(len(items), shard_size, max_shards)):
        url = storage.join(layout.production(bucket_url, batch), "shards", f"{number:04d}.json")
        storage.write_bytes(url, json.dumps(items[start:stop]).encode(), storage_options)
        shard_urls.append(url)
    return {"batch": batch, "n_images": len(items), "shard_urls": shard_urls, "problems": problems}


class NoChampion(ValueError):
    """The run names no model and the registered model has no champion: trying again cannot help."""


def resolve_model(model_uri: str, registered_model: str) -> dict[str, str]:
    """The ``resolve_model`` stage: the model the whole run uses, fixed before the first shard.

    ``model_uri`` when one is given (any URI :func:`tasks.serving.engines.load_engine` opens; a registry
    alias pinned to the version it names now), else the current champion of ``registered_model``.
    Returns ``{"model_uri", "version"}``: ``version`` is the version number for a version of
    ``registered_model`` (what queue items and pool pairs record, and what a rollback is matched
    with), else the model's URI. Raises :class:`NoChampion` when there is no champion yet.
    """
    from tasks import registry

    chosen = model_uri.strip()
    if chosen:
        pinned = registry.pinned_uri(chosen) if chosen.startswith("models:/") else chosen
        name, _, number = pinned.removeprefix("models:/").rpartition("/")
        own = pinned.startswith("models:/") and name == registered_model and number.isdigit()
        return {"model_uri": pinned, "version": number if own else pinned}
    version = registry.alias_version(registered_model, registry.CHAMPION)
    if version is None:
        raise NoChampion(f"registered model {registered_model!r} has no champion yet: run bgremoval_training "
                         "first, then clear this task (the drop stays with this run), or set the model and "
                         "threshold parameters in a new run")
    print(f"champion: {registered_model} version {version}")
    return {"model_uri": registry.model_uri(registered_model, version=version), "version": version}


def resolve_threshold(config: ProductionConfig, model_dir: str | None, model: str | None = None) -> tuple[float, str]:
    """The publishing threshold and where it came from: the config's, else the calibrated one in
    ``<model_dir>/quality.json``, named after ``model`` when given (a registered or remote model's
    ``model_dir`` is a temporary copy). Raises ``ValueError`` when neither exists."""
    from tasks.serving.quality import load_calibration

    if config.threshold is not None:
        return float(config.threshold), "the run's parameter"
    calibration = load_calibration(model_dir) if model_dir else None
    if calibration is None:
        raise ValueError("the model has no calibrated quality threshold (quality.json): set the threshold parameter")
    where = f"{model_dir}/quality.json" if model is None else f"quality.json of {model}"
    return float(calibration.threshold), f"calibration in {where}"


def process_shard(bucket_url: str, batch: str, shard_url: str, model_uri: str, config: ProductionConfig,
                  model_version: str = "", storage_options: dict | None = None, run_id: str = "") -> dict[str, Any]:
    """Cut out one shard of a drop and route every image.

    Args:
        bucket_url: ``s3://bucket`` (or a local folder) holding the storage layout.
        batch: the drop's name; shard_url: a list written by :func:`plan_production`.
        model_uri: what :func:`tasks.serving.engines.load_engine` opens (``models:/name/<version>``, so
            every shard uses the same version even if the champion moves meanwhile).
        config: threshold and output options; model_version: recorded with queued and pooled pairs.
        run_id: the production run (recorded too): the photos an earlier try of this run's shard
            routed are counted as this run's, those of another run as ``earlier``.

    Returns ``{"shard", "images", "published", "queued", "failed", "earlier", "threshold", "threshold_source",
    "refine", "scores": [...], "failed_url"}`` (scores rounded; no pixels); ``earlier``: photos left alone
    because an earlier run or try handled the same bytes (:func:`handled_before`).
    """
    from tasks.feedback.queue import (
        CorrectionsError, PoolMeta, QueueItem, add_to_pool, enqueue, photo_id, prepare_pair,
    )
    from tasks.serving.engines import load_engine, refinement_for
    from tasks.serving.pipeline import InferenceConfig, iter_remove_backgrounds, write_outputs

    listed = [tuple(pair) for pair in json.loads(storage.read_bytes(shard_url, storage_options))]
    earlier, mine = handled_before(bucket_url, batch, listed, run_id, storage_options)
    # An earlier try's photos go through the model again, unwritten: the batches stay those of an
    # uninterrupted run, whose numbers can depend on a photo's batch neighbours.
    items = [(url, stem) for url, stem in listed if url not in earlier]
    keep_freed_memory()  # a task process removing one shard's backgrounds, then ending (tasks.core.heap)
    engine = load_engine(model_uri, storage_options)
    log.info("shard %s: %d photos, model %s", shard_url, len(listed), engine.describe())
    if earlier:
        stems = list(earlier.values())
        log.info("%d photos left as they are: an earlier run of the batch handled the same bytes (%s)",
                 len(stems), ", ".join(stems[:10]) + (" …" if len(stems) > 10 else ""))
    threshold, source = resolve_threshold(config, engine.model_dir, model_uri)
    refine, why = refinement_for(engine, config.refine)
    log.info("edge refinement: %s", why)
    options = InferenceConfig(background=config.background, canvas=config.canvas, margin=config.margin,
                              mask=True, keep_source=True, batch_size=config.batch_size, refine=refine)
    published_url = layout.published(bucket_url, batch)
    counts = {"published": 0, "queued": 0, "failed": 0, "earlier": len(earlier)}
    failed, scores = [], []
    for result in iter_remove_backgrounds(items, engine, options, storage_options):
        if result.source_url in mine:  # routed by this run's earlier try: counted, left as it is
            counts[mine[result.source_url]] += 1
            scores.extend([round(float(result.score), 4)] if result.ok else [])
            continue
        if not result.ok:
            counts["failed"] += 1
            failed.append({"stem": result.stem, "source_url": result.source_url, "reason": result.error})
            continue
        if min(result.width, result.height) < config.min_side:
            counts["failed"] += 1
            failed.append({"stem": result.stem, "source_url": result.source_url,
                           "reason": f"too small: {result.width}x{result.height}, a side under min_side={config.min_side}"})
            continue
        score = float(result.score)
        scores.append(round(score, 4))
        digest = hashlib.sha256(result.source_bytes).hexdigest()
        item_id = photo_id(bucket_url, batch, result.stem, digest, storage_options)
        publish = score >= threshold
        try:  # the image's own work: any failure is this image's, recorded, and the shard goes on
            image_jpeg, mask_png = prepare_pair(result.source_bytes, result.mask_png,
                                                max_side=None if publish else config.review_max_side)
        except Exception as exc:
            counts["failed"] += 1
            failed.append({"stem": result.stem, "source_url": result.source_url,
                           "reason": f"routing: {type(exc).__name__}: {exc}"})
            continue
        try:  # storage errors are not the image's fault: they fail the task, whose retry redoes the shard
            if publish:
                write_outputs(result, published_url, storage_options)
                add_to_pool(bucket_url, item_id, image_jpeg, mask_png,
                            PoolMeta(origin="published", source_url=result.source_url, score=score,
                                     model_version=model_version, item_id=item_id, source_sha256=digest,
                                     run_id=run_id),
                            storage_options)
            else:
                enqueue(bucket_url, QueueItem(stem=result.stem, batch=batch, source_url=result.source_url,
                                              score=score, threshold=threshold, model_uri=model_uri,
                                              model_version=model_version, item_id=item_id,
                                              source_sha256=digest, run_id=run_id,
                                              outputs={"background": config.background, "canvas": config.canvas,
                                                       "margin": config.margin}),
                        image_jpeg, mask_png, storage_options)
        except CorrectionsError as exc:  # the queue or pool refused this image's pair (an empty mask)
            counts["failed"] += 1
            failed.append({"stem": result.stem, "source_url": result.source_url, "reason": f"routing: {exc}"})
            continue
        counts["published" if publish else "queued"] += 1
    failed_url = None
    if failed:
        name = shard_url.rsplit("/", 1)[-1]
        failed_url = storage.join(layout.production(bucket_url, batch), "failed", name)
        storage.write_bytes(failed_url, json.dumps(failed, indent=2).encode(), storage_options)
    return {"shard": shard_url, "images": len(listed), **counts, "threshold": threshold,
            "threshold_source": source, "refine": why, "scores": scores, "failed_url": failed_url}


def handled_before(bucket_url: str, batch: str, items: list[tuple[str, str]], run_id: str = "",
                   storage_options: dict | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The shard's ``(url, stem)`` photos already queued or published with the same bytes: by another
    run of the batch (``{url: stem}``: left as they are) and by an earlier try of this run's shard
    (``run_id``; ``{url: "published" | "queued"}``, counted as this run's).

    Only a photo whose name already has a queue item or pool pair is read and hashed here; a photo
    that is gone or forbidden is left to the cut-out, which reports it."""
    from tasks.feedback.queue import handled_record

    earlier, mine = {}, {}
    for url, stem in items:
        try:
            record = handled_record(bucket_url, batch, stem, lambda: storage.read_bytes(url, storage_options),
                                    storage_options)
        except storage.OBJECT_ERRORS:  # gone or forbidden: the cut-out reports it; any other error fails the task
            continue
        if record is None:
            continue
        if record.get("run_id", "") == run_id and (record["kind"] == "queued" or record.get("origin") == "published"):
            mine[url] = "queued" if record["kind"] == "queued" else "published"
        else:
            earlier[url] = stem
    return earlier, mine


def summarise_production(batch: str, shard_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the shards' counts: ``{"batch", "images", "published", "queued", "failed", "earlier",
    "threshold", "published_share"}``."""
    total = {k: sum(int(r[k]) for r in shard_results) for k in ("images", "published", "queued", "failed", "earlier")}
    thresholds = sorted({r["threshold"] for r in shard_results})
    done = total["published"] + total["queued"]
    return {"batch": batch, **total, "threshold": thresholds[0] if len(thresholds) == 1 else thresholds,
            "published_share": round(total["published"] / done, 4) if done else 0.0}
