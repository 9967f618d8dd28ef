"""The evaluation stage of the training DAG: score the challenger and the champion on the same
test split, judge the gate, write the report, log it all to the training run in MLflow.

:func:`assess_challenger` is the stage function; registration and promotion follow in
:func:`register_and_promote` only when the gate passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import cv2

from tasks import registry
from tasks.core import storage
from tasks.core.codecs import read_image, read_mask
from tasks.evaluation.calibration import calibrate_model
from tasks.evaluation.scoring import load_model, predict_probabilities, score_dataset, score_split
from tasks.evaluation.gate import GateConfig, decide, format_decision
from tasks.evaluation.metrics import MASK_THRESHOLD, format_summary, summarise
from tasks.evaluation.report import GalleryItem, write_report
from tasks.model.io import read_train_result
from tasks.train.data import load_samples

__all__ = ["AssessmentConfig", "assess_challenger", "register_and_promote"]


@dataclass(frozen=True)
class AssessmentConfig:
    """How a challenger is judged.

    ``split``: the manifest split scored (``"test"``); ``threshold``: probability → mask;
    ``gate``: the thresholds; ``registered_model``: the MLflow registered model whose
    ``champion`` alias is the comparison; ``worst``: images in the gallery.
    """

    split: str = "test"
    threshold: float = MASK_THRESHOLD
    gate: GateConfig = field(default_factory=GateConfig)
    registered_model: str = registry.DEFAULT_MODEL_NAME
    worst: int = 16


def metrics_for_mlflow(summary: dict, prefix: str) -> dict[str, float]:
    """An evaluation summary as flat MLflow metrics (and version tags): mean IoU, MAE and boundary F,
    the share of images at each IoU threshold, and each cluster's mean IoU, keys prefixed."""
    metrics = {f"{prefix}mean_iou": summary["mean_iou"], f"{prefix}mean_mae": summary["mean_mae"],
               f"{prefix}mean_boundary_f": summary["mean_boundary_f"]}
    for th, share in summary["share_at_least"].items():
        metrics[f"{prefix}share_iou_ge_{round(float(th) * 100)}"] = share
    for cluster, row in summary["clusters"].items():
        # cluster names are the reviewers' words; MLflow keys allow only [A-Za-z0-9_.\-/: ]
        metrics[f"{prefix}iou_{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(cluster)).strip('_')}"] = row["mean_iou"]
    return {k: float(v) for k, v in metrics.items()}


def training_facts(result: dict) -> dict[str, str]:
    """The report's line on what training did to val IoU, from a training ``result.json``: the starting
    weights' figure (measured before the first step) beside the trained model's, with a warning when
    training lowered it. {} when the run measured no start (random weights)."""
    start, end = result.get("start_val_iou"), (result.get("metrics") or {}).get("val_iou")
    if start is None or end is None:
        return {}
    line = f"{start * 100:.2f} % for the starting weights, {end * 100:.2f} % after training"
    if end < start:
        line += " (training lowered it: a lower learning rate, more pairs or more epochs may help)"
    return {"val IoU": line}


def _gallery(model, meta: dict, dataset_url: str, split: str, worst: list[dict],
             storage_options: dict | None) -> list[GalleryItem]:
    if not worst:
        return []
    rows = {key: (image_url, mask_url) for key, image_url, mask_url, _ in
            load_samples(dataset_url, split, storage_options, include_augmented=False)}
    items = []
    for entry in worst:
        image_url, mask_url = rows[entry["stem"]]
        image, truth = read_image(image_url, storage_options), read_mask(mask_url, storage_options)
        prob = predict_probabilities(model, image, meta["input_size"], meta["resize"], (truth.shape[1], truth.shape[0]))
        if prob.shape != image.shape[:2]:
            image = cv2.resize(image, (truth.shape[1], truth.shape[0]), interpolation=cv2.INTER_AREA)
        items.append(GalleryItem(entry["stem"], str(entry["cluster"]), float(entry["iou"]), image, truth, prob))
    return items


def _audited_pairs(model, meta: dict, dataset_url: str, config: AssessmentConfig, kept: list,
                   storage_options: dict | None) -> dict[str, Any] | None:
    """Score the test pairs the mask audit left out (flagged, not kept or fixed by a reviewer) and
    give both figures: the gate's (without them) and with them. None when none was left out."""
    left_out = score_split(model, meta, dataset_url, config.split, storage_options, config.threshold, audit="only")
    if not left_out:
        return None
    both = summarise([*kept, *left_out], worst=0)
    pairs = sorted(({"stem": s.stem, "iou": s.iou} for s in left_out), key=lambda p: p["iou"])
    text = (f"mask audit: {len(left_out)} {config.split} pair(s) with a flagged, unreviewed mask are left out of "
            f"these figures; with them: mean IoU {both['mean_iou'] * 100:.3f} %, "
            + ", ".join(f"≥{float(th) * 100:g} %: {share * 100:.1f} %" for th, share in both["share_at_least"].items())
            + "; left out: " + ", ".join(f"{p['stem']} ({p['iou'] * 100:.1f} %)" for p in pairs))
    return {"left_out": pairs, "mean_iou_with": both["mean_iou"], "share_at_least_with": both["share_at_least"],
            "n_with": both["n"], "text": text}


def split_sha256(dataset_url: str, split: str, scores, storage_options: dict | None = None) -> str:
    """Digest of the pairs a split's figures were measured on: each scored pair's key and the SHA-256
    of the mask it was scored against (a reviewer's fixed mask, a re-cleaned one, count). The same for
    every dataset version that keeps the split, as retraining does."""
    scored = {s.stem for s in scores}
    masks = {key: mask_url for key, _, mask_url, _ in load_samples(dataset_url, split, storage_options,
                                                                   include_augmented=False) if key in scored}
    data = storage.read_many(list(masks.values()), storage_options)
    if len(data) != len(set(masks.values())):  # a mask that cannot be read would give another record silently
        raise OSError(f"{len(set(masks.values())) - len(data)} of the {split} masks could not be read for the gate's "
                      "record of these pairs")
    lines = sorted(f"{key}\t{hashlib.sha256(data.get(url, b'')).hexdigest()}" for key, url in masks.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def assess_challenger(model_url: str, dataset_url: str, report_url: str, config: AssessmentConfig,
                      storage_options: dict | None = None, mlflow_run_id: str | None = None,
                      champion_uri: str | None = None, facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a freshly trained model, compare it with the champion and write the report.

    Args:
        model_url: the challenger's training output folder (``model.pt`` + ``config.json``).
        dataset_url: the dataset version whose ``split`` is scored.
        report_url: folder (local or ``s3://``) that receives ``report.html``, the plots,
            the gallery and ``assessment.json``.
        config: split, threshold, gate thresholds, registered model name.
        storage_options: fsspec options for the three URLs.
        mlflow_run_id: the training run; when given, the test metrics (``test_*``), the gate
            verdict and the report (under ``report/``) are logged to it.
        champion_uri: the model to beat (default: ``models:/<registered_model>@champion`` when
            that alias exists); it is scored on the same split in this call.
        facts: extra lines for the report's header.

    Returns an XCom-sized dict: ``summary`` (the challenger's :func:`tasks.evaluation.metrics.summarise`),
    ``champion`` (the champion's summary and ``version``, or None), ``gate``
    (:meth:`GateDecision.to_dict`), ``table`` (the seed-style text table), ``report_url``,
    ``report_html`` and ``mlflow_run_id``.
    """
    model, meta = load_model(model_url, storage_options=storage_options)
    trained = read_train_result(model_url, storage_options)
    scores = score_split(model, meta, dataset_url, config.split, storage_options, config.threshold)
    summary = summarise(scores, worst=config.worst)
    audited = _audited_pairs(model, meta, dataset_url, config, scores, storage_options)
    champion_summary, champion_version = None, None
    if champion_uri is None:  # the alias is read once and the version pinned: what is scored is what is compared
        champion_version = registry.alias_version(config.registered_model, registry.CHAMPION)
        if champion_version is not None:
            champion_uri = registry.model_uri(config.registered_model, None, version=champion_version)
    if champion_uri is not None:
        with tempfile.TemporaryDirectory(prefix="bgremoval-champion-") as tmp:
            if registry.is_model_uri(champion_uri):
                folder, champion_options = registry.download_model(champion_uri, tmp), {}
            else:
                folder, champion_options = champion_uri, storage_options
            champion_scores, _ = score_dataset(folder, dataset_url, config.split, storage_options, config.threshold,
                                               model_storage_options=champion_options)
        champion_summary = summarise(champion_scores, worst=0)
    split_digest = split_sha256(dataset_url, config.split, scores, storage_options)
    record = registry.best_champion(config.registered_model, split_digest)
    decision = decide(summary, champion_summary, config.gate, record)
    table = format_summary(summary) + (f"\n{audited['text']}" if audited else "")
    verdict = format_decision(decision)

    header = {"challenger": model_url, "dataset": dataset_url, "split": config.split,
              "input size": meta["input_size"], "threshold": config.threshold,
              "champion": f"{champion_uri} (version {champion_version})" if champion_uri else "none yet",
              **({"MLflow run": mlflow_run_id} if mlflow_run_id else {}),
              **({"mask audit": audited["text"].removeprefix("mask audit: ")} if audited else {}),
              **training_facts(trained), **(facts or {})}
    with tempfile.TemporaryDirectory(prefix="bgremoval-report-") as tmp:
        gallery = _gallery(model, meta, dataset_url, config.split, summary["worst"], storage_options)
        files = write_report(tmp, summary, [s.iou for s in scores], gallery, decision.to_dict(), champion_summary,
                             list(trained.get("history") or []), config.gate.cluster_iou_gate,
                             title="bgremoval: challenger evaluation", facts=header)
        result = {"summary": summary, "gate": decision.to_dict(), "table": table, "verdict": verdict,
                  "champion": None if champion_summary is None else {
                      "uri": champion_uri, "version": champion_version, "mean_iou": champion_summary["mean_iou"],
                      "clusters": champion_summary["clusters"], "share_at_least": champion_summary["share_at_least"]},
                  "report_url": report_url, "report_html": storage.join(report_url, "report.html"),
                  "mlflow_run_id": mlflow_run_id, "model_url": model_url, "input_size": meta["input_size"],
                  "audit": audited, "test_split_sha256": split_digest, "best_champion": record}
        with open(os.path.join(tmp, "assessment.json"), "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        files["assessment.json"] = os.path.join(tmp, "assessment.json")
        for name, path in files.items():
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(report_url, name), fh.read(), storage_options)
        if mlflow_run_id:
            _log_to_mlflow(mlflow_run_id, summary, champion_summary, decision.passed, tmp)
    return json.loads(json.dumps(result, default=str))


def _log_to_mlflow(run_id: str, summary: dict, champion: dict | None, passed: bool, folder: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    metrics = metrics_for_mlflow(summary, "test_")
    if champion is not None:
        metrics["champion_test_mean_iou"] = float(champion["mean_iou"])
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "gate", "passed" if passed else "failed")
    client.log_artifacts(run_id, folder, artifact_path="report")


class PromotionRefused(ValueError):
    """The challenger is not promoted, and trying again cannot change that (it was rolled back)."""


def register_and_promote(assessment: dict[str, Any], dataset_version: str, config: AssessmentConfig,
                         storage_options: dict | None = None, user: str | None = None) -> dict[str, Any]:
    """Register the assessed challenger and make it the champion.

    Refuses (``ValueError``) when the assessment's gate did not pass. Registers into the training
    run (``assessment["mlflow_run_id"]``) with the test metrics and ``dataset_version`` as version
    tags, then promotes if the champion is still the one the challenger was compared with
    (:class:`tasks.registry.ChampionMoved` otherwise: the registered version stays, unpromoted). Returns :func:`tasks.registry.register_model`'s dict plus ``champion``
    and ``previous`` (versions).
    """
    if not assessment["gate"]["passed"]:
        raise ValueError("the gate did not pass: " + "; ".join(assessment["gate"]["reasons"]))
    summary = assessment["summary"]
    tags = {**metrics_for_mlflow(summary, "test_"), "dataset_version": dataset_version,
            "gate": "passed", "report": assessment["report_html"],
            registry.TEST_SPLIT_TAG: assessment["test_split_sha256"]}
    from tasks.serving.mlflow_model import pyfunc_model  # MLflow and pandas: only when registering

    registered = registry.register_model(assessment["model_url"], config.registered_model,
                                         run_id=assessment.get("mlflow_run_id"), tags=tags,
                                         storage_options=storage_options, pyfunc_model=pyfunc_model(),
                                         description=f"mean IoU {summary['mean_iou'] * 100:.3f} % on "
                                                     f"{summary['n']} test images of {dataset_version}")
    # a cleared promote_model must not undo a rollback (only a version registered before can carry one)
    rolled_back = registered["registered_before"] and registry.version_tags(
        config.registered_model, registered["version"]).get(registry.ROLLBACK_TAGS[0])
    if rolled_back:
        raise PromotionRefused(f"version {registered['version']} of {config.registered_model} (this run's model) was "
                               f"rolled back at {rolled_back}: not promoted again (`bgremoval model promote` does it by hand)")
    champion = assessment.get("champion")
    if champion is None:  # there was no champion: promote only if there still is none
        check = {"expected_champion": None}
    elif champion.get("version") is not None:  # compared with the registry's champion: it must not have moved
        check = {"expected_champion": champion["version"]}
    else:  # compared with a model given by hand, outside the registry
        check = {}
    promoted = registry.promote(config.registered_model, registered["version"], user=user,
                                reason=f"gate passed: mean IoU {summary['mean_iou'] * 100:.3f} %", **check)
    return {**registered, **promoted}


def calibrate_challenger(assessment: dict[str, Any], dataset_url: str, target_iou: float,
                         storage_options: dict | None = None) -> dict[str, Any]:
    """The ``calibrate_quality`` stage: the production quality threshold and the edge-refinement
    choice of the challenger that passed the gate (:func:`tasks.evaluation.calibration.calibrate_model`,
    on the val split; both measured on test), logged to the challenger's MLflow run as
    ``quality_threshold``, ``routing_<split>_precision|recall``, ``refine_<split>_plain|refined_mean_iou``
    and the tag ``edge_refinement`` (on/off) when it has one. Returns the calibration with its ``text``."""
    calibration = calibrate_model(assessment["model_url"], dataset_url, storage_options, target_iou=target_iou)
    run_id = assessment.get("mlflow_run_id")
    if run_id:
        import mlflow

        client = mlflow.MlflowClient()
        client.log_metric(run_id, "quality_threshold", calibration["threshold"])
        for split in ("val", "test"):
            if calibration[split]:
                client.log_metric(run_id, f"routing_{split}_precision", calibration[split]["precision"])
                client.log_metric(run_id, f"routing_{split}_recall", calibration[split]["recall"])
        choice, on_test = calibration["refinement"], calibration["refinement_test"]
        client.set_tag(run_id, "edge_refinement", "on" if choice["refine"] else "off")
        for split, figures in ((choice["split"], choice), ("test", on_test)):
            if figures:
                client.log_metric(run_id, f"refine_{split}_plain_mean_iou", figures["plain_mean_iou"])
                client.log_metric(run_id, f"refine_{split}_refined_mean_iou", figures["refined_mean_iou"])
    return calibration
