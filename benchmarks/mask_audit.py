"""Mask audit on real photos: what :func:`tasks.data.mask_audit.audit_pair` flags, and how fast.

Audits every pair of a folder ``images/<stem>.jpg`` + ``masks/<stem>.png`` (e.g.
``../shared/data/viton-garments``), prints the count per reason code, the flagged share, the time
per pair and the load average, and writes to ``--out`` (never into the repository):

* ``audit.csv``: one row per pair (features, reasons, flagged); ``summary.json``;
* contact sheets for a person to hand-check the audit: ``flagged-NNN.jpg`` (every flagged pair)
  and ``unflagged-sample-NNN.jpg`` (``--sample`` random unflagged pairs). Each tile shows the photo
  and the photo with the mask's background tinted magenta, with the stem, the reasons and the
  features below (sp = specks, ro = roughness, fr = fragment share, ho = suspect hole share,
  ed = edge agreement).

Run::

    .venv/bin/python benchmarks/mask_audit.py --data ../shared/data/viton-garments
    .venv/bin/python benchmarks/mask_audit.py --data ../shared/data/ccp-people --out /tmp/bgremoval-mask-audit/ccp
    .venv/bin/python benchmarks/mask_audit.py --model pretrained   # with the model check (model_disagrees)

``--model`` (``pretrained``, a model folder or an ``.onnx`` file) adds the model check: the model's
probability map at the photo's size is passed to the audit, and the pairs only that check flags
are counted apart (model time is reported separately from the audit's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.data.mask_audit import REASONS, AuditConfig, audit_pair, audit_table, summarise  # noqa: E402

TINT = np.array([200, 60, 200], np.float32)  # magenta in BGR


def _pairs(data: Path, limit: int | None) -> list[str]:
    stems = sorted(p.stem for p in (data / "images").glob("*.jpg") if (data / "masks" / f"{p.stem}.png").is_file())
    return stems[:limit] if limit else stems


def _read(data: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.imread(str(data / "images" / f"{stem}.jpg"), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(data / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
    return image, mask


def _tile(image: np.ndarray, mask: np.ndarray, caption: list[str], height: int) -> np.ndarray:
    scale = height / image.shape[0]
    size = (round(image.shape[1] * scale), height)
    photo = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    background = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST) < 128
    overlay = photo.copy()
    overlay[background] = (0.45 * overlay[background] + 0.55 * TINT).astype(np.uint8)
    tile = np.full((height + 14 * len(caption) + 4, 2 * size[0] + 4, 3), 255, np.uint8)
    tile[:height, :size[0]] = photo
    tile[:height, size[0] + 4:] = overlay
    for i, line in enumerate(caption):
        cv2.putText(tile, line, (2, height + 13 + 14 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def _sheets(data: Path, rows: list[dict], out: Path, name: str, height: int, per_sheet: int, ext: str) -> list[Path]:
    paths = []
    for start in range(0, len(rows), per_sheet):
        tiles = []
        for row in rows[start:start + per_sheet]:
            features = (f"sp={row['specks']} ro={row['roughness']:.3f} fr={row['fragment_share']:.3f} "
                        f"ho={row['suspect_hole_share']:.3f} ed={row['edge_agreement']:.2f}"
                        + (f" mi={row['model_iou']:.2f}" if np.isfinite(row.get("model_iou", np.nan)) else ""))
            tiles.append(_tile(*_read(data, row["stem"]), [row["stem"], row["reasons"] or "-", features], height))
        th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
        cols = 6
        grid = np.full((th * -(-len(tiles) // cols), tw * cols, 3), 255, np.uint8)
        for i, t in enumerate(tiles):
            r, c = divmod(i, cols)
            grid[r * th:r * th + t.shape[0], c * tw:c * tw + t.shape[1]] = t
        path = out / f"{name}-{start // per_sheet + 1:03d}.{ext}"
        cv2.imwrite(str(path), grid, [cv2.IMWRITE_JPEG_QUALITY, 85] if ext == "jpg" else [])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "viton-garments")
    parser.add_argument("--limit", type=int, default=None, help="audit only the first N stems (sorted)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bgremoval-mask-audit"))
    parser.add_argument("--sample", type=int, default=100, help="random unflagged pairs on the sample sheets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="pretrained, a model folder or an .onnx file: adds the model check")
    parser.add_argument("--tile-height", type=int, default=256)
    parser.add_argument("--per-sheet", type=int, default=36)
    parser.add_argument("--sheet-format", choices=("jpg", "png"), default="jpg")
    args = parser.parse_args(argv)

    if not (args.data / "images").is_dir():
        print(f"no data at {args.data}: skipped")
        return 0
    if args.out.resolve().is_relative_to(ROOT):
        parser.error("--out must lie outside the repository")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in [*args.out.glob("flagged-*.*"), *args.out.glob("unflagged-sample-*.*")]:
        old.unlink()

    config = AuditConfig()
    stems = _pairs(args.data, args.limit)
    load_start = os.getloadavg()
    engine = None
    if args.model:
        from tasks.serving.engines import load_engine, probability_map

        engine = load_engine(args.model)
        print(f"model check with {engine.describe()}")
    audits, seconds, model_seconds = [], [], []
    start, cpu_start = time.perf_counter(), time.process_time()
    for stem in stems:
        image, mask = _read(args.data, stem)
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        probability = None
        if engine is not None:
            t = time.perf_counter()
            probability = probability_map(engine, rgb)
            model_seconds.append(time.perf_counter() - t)
        t = time.perf_counter()
        audits.append((stem, audit_pair(rgb, mask, config, probability=probability)))
        seconds.append(time.perf_counter() - t)
    total_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    load_end = os.getloadavg()

    df = audit_table(audits)
    summary = summarise(df)
    df.to_csv(args.out / "audit.csv", index=False)
    n = max(len(stems), 1)
    summary.update(data=str(args.data), audit_ms_per_pair=1000 * sum(seconds) / n,
                   audit_ms_median=1000 * float(np.median(seconds or [0.0])), total_ms_per_pair=1000 * total_s / n,
                   cpu_ms_per_pair=1000 * cpu_s / n, load_start=load_start[0], load_end=load_end[0],
                   cpus=os.cpu_count(), config=asdict(config), model=args.model,
                   model_ms_per_pair=1000 * sum(model_seconds) / n if model_seconds else None,
                   model_only=int((df["reasons"] == "model_disagrees").sum()))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    flagged = df[df["flagged"]].to_dict("records")
    unflagged = df[~df["flagged"]].to_dict("records")
    sample = random.Random(args.seed).sample(unflagged, min(args.sample, len(unflagged)))
    sheets = []
    for name, rows in (("flagged", flagged), ("unflagged-sample", sorted(sample, key=lambda r: r["stem"]))):
        sheets += _sheets(args.data, rows, args.out, name, args.tile_height, args.per_sheet, args.sheet_format)

    print(f"mask audit of {args.data} ({summary['pairs']} pairs)")
    print(f"{'reason':<18}{'pairs':>8}{'share':>9}")
    for code in REASONS:
        n = summary["reasons"].get(code, 0)
        print(f"{code:<18}{n:>8}{n / max(summary['pairs'], 1):>9.1%}")
    print(f"{'flagged (any)':<18}{summary['flagged']:>8}{summary['flagged_share']:>9.1%}")
    if engine is not None:
        print(f"flagged by the model check alone: {summary['model_only']}; "
              f"model {summary['model_ms_per_pair']:.1f} ms/pair ({args.model})")
    print(f"audit {summary['audit_ms_per_pair']:.2f} ms/pair, median {summary['audit_ms_median']:.2f} "
          f"(with decoding {summary['total_ms_per_pair']:.2f}; CPU time with decoding "
          f"{summary['cpu_ms_per_pair']:.2f}, all threads); "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out / 'audit.csv'}, summary.json and {len(sheets)} contact sheets to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
