"""The evaluation report: PNG plots, a gallery of the worst images and one HTML page.

:func:`write_report` writes into a local folder

* ``iou_histogram.png`` — per-image IoU, with the 95/97/99 % lines,
* ``cluster_iou.png`` — mean IoU per product cluster (the champion's beside it when known) and
  the cluster gate,
* ``training_curves.png`` — loss and validation IoU per epoch (when a training history is given),
* ``worst_gallery.jpg`` — the worst images with their masks overlaid (:func:`overlay`),
* ``report.html`` — the seed's table, the gate's verdict and every picture above embedded as a
  data URI, so the page reads the same from S3, from disk and in MLflow's artifact viewer.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from tasks.evaluation.metrics import MASK_THRESHOLD, as_binary

__all__ = ["GalleryItem", "overlay", "write_report"]

_FALSE_POSITIVE = np.array([230, 40, 40], np.float32)   # predicted, not in the truth: red
_FALSE_NEGATIVE = np.array([40, 90, 240], np.float32)   # in the truth, missed: blue
_OUTLINE = (20, 200, 60)                                # the true outline: green
_TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")


@dataclass
class GalleryItem:
    """One gallery entry: the image (RGB uint8), its true mask, the predicted probability map
    (both at the image's size) and its scores."""

    stem: str
    cluster: str
    iou: float
    image: np.ndarray
    truth: np.ndarray
    probability: np.ndarray


def overlay(image: np.ndarray, truth: np.ndarray, probability: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Draw a prediction's errors on the image: false positives tinted red, missed foreground
    tinted blue, the true outline in green. Returns RGB uint8 of the image's size.
    Raises ``ValueError`` when the three arrays do not share height and width."""
    if not (image.shape[:2] == truth.shape[:2] == probability.shape[:2]):
        raise ValueError(f"image {image.shape[:2]}, truth {truth.shape[:2]} and probability "
                         f"{probability.shape[:2]} must have the same size")
    out = image.astype(np.float32).copy()
    t = as_binary(truth)
    p = probability > threshold
    for region, colour in ((p & ~t, _FALSE_POSITIVE), (t & ~p, _FALSE_NEGATIVE)):
        out[region] = 0.35 * out[region] + 0.65 * colour
    result = np.clip(out, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(t.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(image.shape[:2]) / 300))
    cv2.drawContours(result, contours, -1, _OUTLINE, thickness)
    return result


def _gallery(items: Sequence[GalleryItem], tile: int = 220, columns: int = 4) -> np.ndarray:
    rows = max(1, -(-len(items) // columns))
    caption = 34
    sheet = np.full((rows * (tile + caption), columns * tile, 3), 255, np.uint8)
    for i, item in enumerate(items):
        picture = overlay(item.image, item.truth, item.probability)
        scale = tile / max(picture.shape[:2])
        w, h = max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale))
        picture = cv2.resize(picture, (w, h), interpolation=cv2.INTER_AREA)
        r, c = divmod(i, columns)
        y, x = r * (tile + caption), c * tile
        sheet[y + (tile - h) // 2:y + (tile - h) // 2 + h, x + (tile - w) // 2:x + (tile - w) // 2 + w] = picture
        for line, text in enumerate((f"{item.iou * 100:.2f} % IoU", f"{item.stem[:22]} / {item.cluster[:12]}")):
            cv2.putText(sheet, text, (x + 4, y + tile + 13 + 15 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                        (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def _plots(out_dir: str, ious: Sequence[float], summary: dict, champion: dict | None, cluster_gate: float | None,
           history: Sequence[dict] | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    values = np.asarray(ious, np.float64) * 100
    low = min(80.0, float(values.min()) if values.size else 80.0)
    ax.hist(values, bins=np.linspace(low, 100, 41), color="#4878a8")
    for th, style in ((95, ":"), (97, "--"), (99, "-")):
        ax.axvline(th, color="#c44", linestyle=style, linewidth=1, label=f"{th} %")
    ax.set_xlabel("IoU per image (%)")
    ax.set_ylabel("images")
    ax.set_title(f"IoU on the test split (n={len(values)}, mean {summary['mean_iou'] * 100:.2f} %)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "iou_histogram.png"), dpi=110)
    plt.close(fig)
    written.append("iou_histogram.png")

    clusters = list(summary["clusters"])
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(clusters) + 1.4))
    y = np.arange(len(clusters))
    ax.barh(y + (0.2 if champion else 0), [summary["clusters"][c]["mean_iou"] * 100 for c in clusters],
            height=0.4 if champion else 0.6, color="#4878a8", label="challenger")
    if champion:
        ax.barh(y - 0.2, [champion.get("clusters", {}).get(c, {}).get("mean_iou", np.nan) * 100 for c in clusters],
                height=0.4, color="#aaa", label="champion")
    if cluster_gate is not None:
        ax.axvline(cluster_gate * 100, color="#c44", linestyle="--", linewidth=1, label="cluster gate")
    ax.set_yticks(y, [f"{c} ({summary['clusters'][c]['n']})" for c in clusters])
    ax.set_xlabel("mean IoU (%)")
    lows = [summary["clusters"][c]["mean_iou"] * 100 for c in clusters] + ([cluster_gate * 100] if cluster_gate else [])
    ax.set_xlim(max(0.0, min(lows) - 5), 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8, frameon=False)
    ax.set_title("mean IoU per product cluster")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cluster_iou.png"), dpi=110)
    plt.close(fig)
    written.append("cluster_iou.png")

    if history:
        epochs = [h["epoch"] for h in history]
        fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2))
        left.plot(epochs, [h.get("train_loss") for h in history], marker="o", label="train")
        if any(h.get("val_loss") is not None for h in history):
            left.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="val")
        left.set_xlabel("epoch")
        left.set_ylabel("loss")
        left.legend()
        right.plot(epochs, [(h.get("val_iou") or np.nan) * 100 for h in history], marker="o", color="#4878a8")
        right.set_xlabel("epoch")
        right.set_ylabel("validation IoU (%)")
        fig.suptitle("training")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "training_curves.png"), dpi=110)
        plt.close(fig)
        written.append("training_curves.png")
    return written


def _data_uri(path: str) -> str:
    kind = "jpeg" if path.endswith(".jpg") else "png"
    with open(path, "rb") as fh:
        return f"data:image/{kind};base64,{base64.b64encode(fh.read()).decode()}"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{float(value) * 100:.3f} %"


def _num(value: Any) -> str:
    return "–" if value is None else f"{float(value):.4f}"


def _seed_rows(summary: dict, champion: dict | None) -> list[tuple[str, str, str]]:
    """The seed's table: (measure, challenger, champion) rows."""
    other = champion or {}
    rows = [("mean IoU", _pct(summary["mean_iou"]), _pct(other.get("mean_iou")))]
    rows += [(f"images ≥ {float(th) * 100:g} % IoU", _pct(share), _pct(other.get("share_at_least", {}).get(th)))
             for th, share in summary["share_at_least"].items()]
    rows += [("mean MAE", _num(summary["mean_mae"]), _num(other.get("mean_mae"))),
             ("mean boundary F", _num(summary["mean_boundary_f"]), _num(other.get("mean_boundary_f")))]
    return rows


def _cluster_rows(summary: dict, champion: dict | None) -> list[tuple[str, int, str, str]]:
    """(cluster, images, challenger's mean IoU, champion's) rows."""
    other = (champion or {}).get("clusters", {})
    return [(str(c), row["n"], _pct(row["mean_iou"]), _pct(other.get(c, {}).get("mean_iou")))
            for c, row in summary["clusters"].items()]


def _render_page(**context: Any) -> str:
    """``templates/report.html`` filled in (autoescaped)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    return environment.get_template("report.html").render(**context)


def write_report(out_dir: str, summary: dict, ious: Sequence[float], gallery: Sequence[GalleryItem],
                 decision: dict | None = None, champion: dict | None = None, history: Sequence[dict] | None = None,
                 cluster_gate: float | None = None, title: str = "bgremoval evaluation",
                 facts: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the report's files into ``out_dir`` (created).

    Args:
        summary: :func:`tasks.evaluation.metrics.summarise` of the challenger on the test split.
        ious: every image's IoU (for the histogram).
        gallery: the worst images, worst first (:class:`GalleryItem`).
        decision: :meth:`tasks.evaluation.gate.GateDecision.to_dict` output, shown as a banner with every check.
        champion: the champion's summary on the same split, shown beside the challenger.
        history: the training history (``TrainResult.history``) for the curves.
        cluster_gate: drawn on the cluster chart.
        title: the page title; ``facts``: extra ``name: value`` lines (model, dataset, run ids).

    Returns ``{file name: local path}`` for every file written, ``report.html`` included.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = _plots(out_dir, ious, summary, champion, cluster_gate, history)
    if gallery:
        sheet = _gallery(gallery)
        cv2.imwrite(os.path.join(out_dir, "worst_gallery.jpg"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 88])
        written.append("worst_gallery.jpg")
    pictures = {name: _data_uri(os.path.join(out_dir, name)) for name in written}
    headings = (("iou_histogram.png", "IoU distribution"), ("cluster_iou.png", "IoU per cluster"),
                ("training_curves.png", "Training curves"),
                ("worst_gallery.jpg", f"The {len(gallery)} worst images "
                                      "(red: predicted but background, blue: missed, green: true outline)"))
    page = _render_page(
        title=title, facts=[(str(k), str(v)) for k, v in (facts or {}).items()], decision=decision,
        n=summary["n"], has_champion=bool(champion), seed_rows=_seed_rows(summary, champion),
        cluster_rows=_cluster_rows(summary, champion),
        figures=[(heading, name, pictures[name]) for name, heading in headings if name in pictures],
        worst=[(w["stem"], str(w["cluster"]), f"{w['iou'] * 100:.3f} %") for w in summary.get("worst", [])],
    )
    with open(os.path.join(out_dir, "report.html"), "w", encoding="utf-8") as fh:
        fh.write(page)
    written.append("report.html")
    return {name: os.path.join(out_dir, name) for name in written}
