"""Quality on real photos: GrabCut, the published U2-NetP and a fine-tuned U2-NetP, side by side.

One run, one dataset version, one test split, one scorer, two real sets (``../shared/data``, see
its README; each set is optional with ``--sets``):

* ``viton-garments``: 2,982 studio photos of upper-body garments on white, 192×256,
  silver-standard masks (often wrong on pale garments), cluster ``tops``;
* ``ccp-people``: 943 hand-labelled street photos of people, about 330×512, cluster ``people``.

Steps (the project's own stages, as the training DAG runs them):

1. a raw batch under ``--work`` (``bucket/raw/<batch>/images|masks``) whose files are per-file
   symlinks to the sets' files (stems are ``viton_*`` / ``ccp_*``, so they never collide); the
   data folder is only linked, never written or copied into the repository;
2. cleaning (``tasks.data.ingest``) at working size ``--working-size`` (default 512: ccp keeps its
   native 512 px; viton's 192×256 is *upscaled* to 384×512 for training);
3. the cluster of a row is its set (``tops`` / ``people``), and a hash-stable 80/10/10 split
   stratified by cluster (``tasks.data.splits``, seed 0);
4. the methods, each scored on the SAME test rows by the SAME code:

   * **GrabCut** (``cv2.grabCut``) from a centred rectangle with a 5 % margin on each side,
     5 iterations, at the photo's own resolution: an anchor that needs no training. Its
     prediction is binary, so its "MAE" is the share of wrong pixels;
   * **zero-shot**: the published U2-NetP (rembg's ``u2netp.onnx``) through ONNX Runtime at its
     fixed 320 px input (``tasks.evaluation.scoring.load_model`` on the ``.onnx`` path);
     ``--also-zero-shot FILE...`` adds a column per file for other rembg-family ONNX files scored
     the same way (e.g. rembg's ``u2net.onnx``, the full U2-Net);
   * **fine-tuned**: U2-NetP (or U2-Net, ``--model``) trained on the train split of all selected sets together
     (``tasks.train.ddp.launch_local``, ``--workers`` torch.distributed processes), starting from
     the published weights (``--init pretrained``; the loop calibrates their identity batch-norm
     on the first training images) or from scratch (``--init scratch``), at ``--input-size``;
   * **fine-tuned+flip** (``--flip``): the same model with test-time flip
     (:class:`tasks.serving.engines.FlipAveragedEngine`, what ``bgremoval remove --flip`` runs: the
     mean of the logits on the photo and its mirror, scored through
     :class:`tasks.serving.onnx_module.EngineModule`).

Scoring. ``tasks.evaluation.scoring.score_dataset`` scores the *clean* pairs of the manifest
(``image_url``/``mask_url``: the image and mask at working resolution, i.e. viton upscaled to
384×512 and re-encoded), not the photos. This benchmark therefore scores the manifest's
``image_source``/``mask_source`` (the original photo and mask) with the same function
``score_dataset`` ends in, :func:`tasks.evaluation.scoring.evaluate_pairs`: the network sees the original
photo (preprocessed as in training), the probability map is resized straight to the original
mask's size, thresholded at 0.5, and IoU / MAE / boundary F come from ``tasks.evaluation.metrics``. GrabCut's
masks go through the same ``tasks.evaluation.metrics`` functions. Each table is
``tasks.evaluation.metrics.summarise``/``format_summary`` of per-image scores, printed per set and method
next to the seed's numbers (U2-Net on the seed's studio data: mean 99.435 %, 99.3 / 98.7 / 93.1 %
of images at ≥ 95 / 97 / 99 % IoU).

Cost. Every method reports wall-clock time and CPU time: in-process work (GrabCut, scoring,
calibration) is ``time.process_time()`` (all threads of this process); training is
``resource.getrusage(RUSAGE_CHILDREN)`` around ``launch_local`` (torchrun and its workers, counted
when they are reaped). The load average (``os.getloadavg``) is printed with the tables: on a
shared machine wall time says little.

Broken masks. Cleaning now runs the project's mask audit (:mod:`tasks.data.mask_audit`) and records
its reasons in the manifest; the training loop leaves flagged pairs out (as in production) unless
``--audit keep`` marks them all as kept. Every test table is printed for all test photos and
again without the flagged ones (what the gate's test split holds). ``--exclude-stems FILE`` (one
stem per line, ``#`` comments) names further pairs with broken masks: they are left out of
training too, and the tables are printed once more without them.
``--max-train N`` keeps at most N training pairs per set (lowest hash first) for quick runs.
These three act on a derived manifest (``datasets/<version>~<tag>/manifest.parquet``, same clean
files, same val/test rows); the base dataset version is not changed. ``--max-test N`` scores only N test
photos per set (quick checks of the script; never for reported numbers). GrabCut costs about 5 CPU
seconds per ccp photo: ``--reuse-anchors`` takes the GrabCut / zero-shot per-image scores saved by an
earlier run on exactly the same test rows (``--work/anchor-scores/``; their cost is reported as
measured then), so a fine-tuning run still prints all three methods side by side; the anchors
are computed after the training for that reason. ``--run-name NAME`` names the training run under
``--work/runs``: the name of a stopped run resumes it from its last epoch (training is also
relaunched by itself up to ``--train-retries`` times), a finished one is only scored again; the
training cost is summed over the invocations of a run.

For the fine-tuned model the script also calibrates the production routing threshold
(``tasks.evaluation.calibration.calibrate_model`` with target IoU 0.97, on val; routing measured on test —
note that it scores the clean pairs, at working resolution, without the audit-flagged ones),
registers the model as
``--model-name`` with the alias ``champion`` in the MLflow store (``--mlflow``, default SQLite under
``--work``), and writes a contact sheet of the 16 worst test images per set (photo with the mask
outline in green; prediction with its outline in red) to ``--work/contact-sheets/`` (JPEG; never
into the repository).

Runs::

    # quick end-to-end check (minutes)
    .venv/bin/python benchmarks/quality_real.py --max-train 200 --epochs 1 --input-size 192
    # the two anchors only, on the full test splits
    .venv/bin/python benchmarks/quality_real.py --skip-finetune
    # a real fine-tuning run (about an hour on a loaded 2-core CPU)
    .venv/bin/python benchmarks/quality_real.py --epochs 2 --input-size 256 --json /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
DEFAULT_WORK = "/tmp/bgremoval-quality-real"
#: set folder → (cluster of its rows, stem prefix)
SETS = {"viton-garments": ("tops", "viton_"), "ccp-people": ("people", "ccp_")}
SEED_TABLE = {"mean_iou": 0.99435, 0.95: 0.993, 0.97: 0.987, 0.99: 0.931}
METHODS = ("grabcut", "zero-shot", "fine-tuned", "fine-tuned+flip")
GRABCUT_MARGIN = 0.05
GRABCUT_ITERATIONS = 5


# ----------------------------------------------------------------------------------------------
# Data: one dataset version holding every selected set
# ----------------------------------------------------------------------------------------------

def _link_batch(work: Path, sets: list[str]) -> str:
    """A raw batch ``bucket/raw/<batch>/{images,masks}`` of per-file symlinks to the sets' files."""
    batch = "real-" + "+".join(sets)
    from tasks.core import layout

    base = Path(layout.raw_batch(str(work / "bucket"), batch))
    for sub in ("images", "masks"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name in sets:
        for sub in ("images", "masks"):
            for src in sorted((DATA / name / sub).iterdir()):
                dst = base / sub / src.name
                if not dst.is_symlink():
                    dst.symlink_to(src.resolve())
    return batch


def _prepare(work: Path, sets: list[str], working_size: int) -> dict:
    from tasks.core import layout
    from tasks.data import ingest
    from tasks.data.cleaning import CleaningConfig
    from tasks.core.manifest import read_table, write_table
    from tasks.data.splits import SplitConfig, format_split_summary, split_dataset, split_summary

    batch = _link_batch(work, sets)
    config = CleaningConfig(working_size=working_size)
    plan = ingest.plan_batch(str(work / "bucket"), batch, config, shard_size=500)
    manifest_url = layout.manifest(plan["dataset_url"])
    if not Path(manifest_url).exists():
        started = time.time()
        results = []
        for i, url in enumerate(plan["shard_urls"], 1):
            results.append(ingest.clean_shard(url, plan["dataset_url"], batch, config))
            print(f"  cleaned shard {i}/{len(plan['shard_urls'])}", flush=True)
        summary = ingest.finalize_dataset(plan["dataset_url"], batch, [r["result_url"] for r in results],
                                          plan["listing_rejects_url"])
        print(ingest.format_summary(summary))
        print(f"  cleaning took {time.time() - started:.0f} s")
    manifest = read_table(manifest_url)
    clusters = manifest["stem"].astype(str).map(
        lambda s: next((c for c, prefix in SETS.values() if s.startswith(prefix)), None))
    manifest["cluster"] = clusters.where(manifest["status"] == "ok", manifest["cluster"])
    write_table(manifest, manifest_url)
    splits = split_dataset(plan["dataset_url"], SplitConfig(0.8, 0.1, 0.1, seed=0))
    manifest = read_table(manifest_url)
    print(f"dataset version {plan['version']} ({plan['dataset_url']}), working size {working_size}; "
          f"split: hash of the stem, seed 0, stratified by cluster (= set)")
    print(format_split_summary(split_summary(manifest)))
    quarantined = manifest[manifest["status"] != "ok"]
    if len(quarantined):
        print(f"quarantined by cleaning: {len(quarantined)} "
              f"({quarantined['reason'].value_counts().to_dict()})")
    return {"dataset_url": plan["dataset_url"], "version": plan["version"], "batch": batch,
            "splits": splits["counts"], "manifest": manifest}


def _read_stems(path: str | None) -> set[str]:
    if not path:
        return set()
    stems = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            stems.add(Path(line).stem if line.lower().endswith((".jpg", ".png")) else line)
    return stems


def _train_dataset(dataset: dict, max_train: int | None, excluded: set[str], audit: str) -> tuple[str, dict]:
    """The dataset URL training uses: the base version, or a derived manifest (same clean files,
    same val/test) with excluded stems and pairs beyond ``max_train`` per set taken out of train,
    and with ``audit == "keep"`` every mask the cleaning audit flagged marked as kept (so the loop
    trains on it)."""
    from tasks.core import layout
    from tasks.core.manifest import audit_flagged, write_table
    from tasks.data.splits import stem_uniform

    manifest = dataset["manifest"].copy()
    train = (manifest["status"] == "ok") & (manifest["split"] == "train")
    dropped = {"excluded": 0, "over_cap": 0, "audit_kept": 0}
    if audit == "keep":
        flagged = audit_flagged(manifest) & (manifest["status"] == "ok")
        manifest.loc[flagged, "audit_decision"] = "keep"
        dropped["audit_kept"] = int(flagged.sum())
    if excluded:
        hit = train & (manifest["stem"].astype(str).isin(excluded) | manifest["key"].astype(str).isin(excluded))
        manifest.loc[hit, "split"] = "excluded"
        dropped["excluded"] = int(hit.sum())
    if max_train is not None:
        for cluster in sorted(manifest.loc[train, "cluster"].dropna().unique()):
            rows = manifest[(manifest["split"] == "train") & (manifest["cluster"] == cluster)]
            order = sorted(rows.index, key=lambda i: (stem_uniform(str(rows.at[i, "stem"]), 0), str(rows.at[i, "stem"])))
            over = order[max_train:]
            manifest.loc[over, "split"] = "unused"
            dropped["over_cap"] += len(over)
    if not any(dropped.values()):
        return dataset["dataset_url"], dropped
    tag = f"train-max{max_train}" if max_train is not None else "train"
    if audit == "keep":
        tag += "-auditkeep"
    if excluded:
        import hashlib

        tag += "-excl" + hashlib.sha256("\n".join(sorted(excluded)).encode()).hexdigest()[:8]
    url = f"{dataset['dataset_url']}~{tag}"
    Path(url).mkdir(parents=True, exist_ok=True)
    write_table(manifest, layout.manifest(url))
    return url, dropped


@dataclass
class TestRow:
    key: str
    stem: str
    cluster: str
    image: str  # the original photo (the manifest's image_source)
    mask: str   # the original mask (mask_source)
    audit: str  # reasons of the cleaning's mask audit ("" when not flagged)


def _split_rows(manifest, split: str = "test") -> list[TestRow]:
    from tasks.core.manifest import audit_excluded

    manifest = manifest.assign(audit_flagged_now=audit_excluded(manifest))
    rows = manifest[(manifest["status"] == "ok") & (manifest["split"] == split)].sort_values("key")
    return [TestRow(str(r.key), str(r.stem), str(r.cluster), str(r.image_source), str(r.mask_source),
                    str(r.audit_reasons or "") if r.audit_flagged_now else "")
            for r in rows.itertuples()]


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """``--work``, ``--sets`` and ``--split``: which of this script's splits another benchmark scores
    (``val`` to choose between variants, ``test`` to report the chosen one)."""
    parser.add_argument("--work", default=DEFAULT_WORK, help="quality_real.py's working folder")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="the rows scored: val to choose, test to report (default test)")


def split_rows(args: argparse.Namespace) -> list[TestRow] | None:
    """The rows of ``args.split`` (test unless told) of the split under ``args.work`` (cleaned there
    on first use); None, saying why, without ``../shared/data``."""
    if not all((DATA / s).is_dir() for s in args.sets):
        print(f"{DATA} not here: this benchmark needs ../shared/data", file=sys.stderr)
        return None
    manifest = _prepare(Path(args.work).resolve(), args.sets, 512)["manifest"]
    return _split_rows(manifest, args.split)


class VariantTable:
    """IoU and boundary F of several variants of one model (refinements, input sizes) on the split's
    rows, per set, on all rows and without the audit-flagged masks; printed as one markdown table."""

    def __init__(self) -> None:
        self.scores: dict[tuple[str, str], dict[str, tuple[list, list]]] = {}

    def add(self, row: TestRow, variant: str, pred, truth) -> None:
        """Score one row's binary prediction ``pred`` of ``variant`` against ``truth``."""
        from tasks.evaluation.metrics import boundary_f, iou

        for rows_kind in ("all", "without flagged") if not row.audit else ("all",):
            ious, bfs = self.scores.setdefault((row.cluster, rows_kind), {}).setdefault(variant, ([], []))
            ious.append(iou(pred, truth))
            bfs.append(boundary_f(pred, truth))

    def print(self, first_column: str, cost_column: str, cost_ms) -> None:
        """The table: one line per set, rows kind and variant; ``cost_ms(variant)`` fills the last column
        (None leaves it empty)."""
        import numpy as np

        print(f"| {first_column} | n | mean IoU | ≥ 95 | ≥ 97 | ≥ 99 | boundary F | {cost_column} |")
        print("|---|---|---|---|---|---|---|---|")
        for (cluster, rows_kind), per_variant in sorted(self.scores.items()):
            for variant, (ious, bfs) in per_variant.items():
                v, ms = np.asarray(ious), cost_ms(variant)
                shares = " | ".join(f"{np.mean(v >= t) * 100:5.1f} %" for t in (0.95, 0.97, 0.99))
                cost = "" if ms is None else f"{ms:6.2f}"
                label = f"{cluster} {rows_kind}: {variant}"
                print(f"| {label:<34} | {len(v):>4} | {v.mean() * 100:7.3f} % | {shares} "
                      f"| {np.mean(bfs):.3f} | {cost:>6} |")


    def print_paired(self, first: str, second: str) -> None:
        """The per-photo difference ``second − first`` of IoU on the same rows, per set and rows kind:
        its mean ± one standard error (points), and how many photos each variant scores higher."""
        import numpy as np

        print(f"| rows | n | {second} − {first}: mean IoU (points) | photos higher: {second} / {first} |")
        print("|---|---|---|---|")
        for (cluster, rows_kind), per_variant in sorted(self.scores.items()):
            a, b = (np.asarray(per_variant[v][0]) for v in (first, second))
            gain = (b - a) * 100
            se = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float("nan")
            print(f"| {cluster} {rows_kind} | {len(gain)} | {gain.mean():+.3f} ± {se:.3f} "
                  f"| {int((gain > 0).sum())} / {int((gain < 0).sum())} |")


def score_interleaved(rows: list[TestRow], predictors: dict) -> tuple[VariantTable, dict[str, float], tuple, tuple]:
    """Score each variant of ``predictors`` (label → ``predict(image, (width, height))`` giving the
    probability map) on every row, the variants interleaved photo by photo so that they share the
    machine's load. Returns the table, each variant's CPU seconds (this process, all threads), and
    the load average at start and end."""
    from tasks.evaluation.metrics import MASK_THRESHOLD

    table, seconds = VariantTable(), dict.fromkeys(predictors, 0.0)
    load_start = os.getloadavg()
    for row, (_, _, image, mask) in zip(rows, _pairs(rows)):
        height, width = mask.shape[:2]
        truth = mask >= 128
        for label, predict in predictors.items():
            started = time.process_time()
            pred = predict(image, (width, height)) > MASK_THRESHOLD
            seconds[label] += time.process_time() - started
            table.add(row, label, pred, truth)
    return table, seconds, load_start, os.getloadavg()


def _audit_counts(manifest, clusters: list[str]) -> str:
    """Per set and split: how many clean pairs the cleaning's mask audit flagged."""
    from collections import Counter

    from tasks.core.manifest import audit_excluded

    ok = manifest[manifest["status"] == "ok"]
    flagged = ok[audit_excluded(ok)]
    lines = ["masks flagged by the cleaning's audit (kept out of training and of the gate's test split):"]
    for cluster in clusters:
        part = flagged[flagged["cluster"] == cluster]
        per_split = {s: int((part["split"] == s).sum()) for s in ("train", "val", "test")}
        reasons = Counter(code for value in part["audit_reasons"] for code in str(value).split(",") if code)
        lines.append(f"  {cluster:<8} {len(part):>4} of {int((ok['cluster'] == cluster).sum())} "
                     f"({per_split}); reasons {dict(reasons.most_common())}")
    return "\n".join(lines)


def _pairs(rows: list[TestRow]):
    from tasks.core.codecs import read_image, read_mask

    for row in rows:
        yield row.key, row.cluster, read_image(row.image, None), read_mask(row.mask, None)


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

@dataclass
class Cost:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    how: str = ""
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def minutes(self) -> str:
        return f"{self.cpu_s / 60:.1f} CPU min ({self.wall_s / 60:.1f} wall min)"


@dataclass
class MethodResult:
    scores: list = field(default_factory=list)
    score_cost: Cost = field(default_factory=Cost)
    train_cost: Cost | None = None
    note: str = ""


class _InProcess:
    """Wall and CPU time of this process (all threads) over a block."""

    def __enter__(self) -> Cost:
        self.cost = Cost(how="time.process_time (this process, all threads)")
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self.cost

    def __exit__(self, *exc) -> None:
        self.cost.wall_s = time.perf_counter() - self._wall
        self.cost.cpu_s = time.process_time() - self._cpu
        self.cost.load = os.getloadavg()


def grabcut_mask(image_rgb, margin: float = GRABCUT_MARGIN, iterations: int = GRABCUT_ITERATIONS):
    """GrabCut from the centred rectangle that leaves ``margin`` of each side out; returns a bool
    foreground mask at the image's own size."""
    import cv2
    import numpy as np

    h, w = image_rgb.shape[:2]
    x0, y0 = int(round(w * margin)), int(round(h * margin))
    rect = (x0, y0, max(1, w - 2 * x0), max(1, h - 2 * y0))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _run_grabcut(rows: list[TestRow]) -> MethodResult:
    import numpy as np

    from tasks.evaluation.metrics import ImageScore, boundary_f, iou, mae

    scores = []
    with _InProcess() as cost:
        for i, (key, cluster, image, truth) in enumerate(_pairs(rows), 1):
            if image.shape[:2] != truth.shape:
                raise ValueError(f"{key}: image {image.shape[:2]} and mask {truth.shape} differ in size")
            pred = grabcut_mask(image)
            scores.append(ImageScore(stem=key, cluster=cluster, iou=iou(pred, truth),
                                     mae=mae(pred.astype(np.float32), truth), boundary_f=boundary_f(pred, truth)))
            if i % 100 == 0:
                print(f"  grabcut {i}/{len(rows)}", flush=True)
    return MethodResult(scores=scores, score_cost=cost,
                        note=f"rectangle margin {GRABCUT_MARGIN:.0%}, {GRABCUT_ITERATIONS} iterations, binary output")


def scoring_model(model_url: str, flip: bool = False):
    """``(model, meta)`` to score ``model_url`` with: :func:`tasks.evaluation.scoring.load_model`, or
    with ``flip`` the test-time flip ``bgremoval remove --flip`` runs (the mean of the logits on the
    photo and its mirror, as a torch module)."""
    from tasks.evaluation.scoring import load_model
    from tasks.serving.engines import FlipAveragedEngine, load_engine
    from tasks.serving.onnx_module import EngineModule

    if not flip:
        return load_model(model_url)
    backend = "onnx" if model_url.lower().endswith(".onnx") else "torch"  # the file load_model reads
    engine = load_engine(model_url, device="cpu", backend=backend)
    return EngineModule(FlipAveragedEngine(engine)), {"input_size": engine.input_size, "resize": engine.resize}


def _score_model(model_url: str, rows: list[TestRow], flip: bool = False) -> tuple[list, Cost, dict]:
    from tasks.evaluation.scoring import evaluate_pairs

    with _InProcess() as cost:
        model, meta = scoring_model(model_url, flip)
        scores = evaluate_pairs(model, _pairs(rows), meta["input_size"], 0.5, meta["resize"])
    return scores, cost, meta


def _run_zero_shot(rows: list[TestRow], onnx_path: str | None = None) -> MethodResult:
    """Scores of an ONNX file as it is (the published U2-NetP without ``onnx_path``)."""
    from tasks.model.published import require_pretrained_onnx

    onnx_path = onnx_path or str(require_pretrained_onnx())
    scores, cost, meta = _score_model(onnx_path, rows)
    return MethodResult(scores=scores, score_cost=cost,
                        note=f"{onnx_path} via ONNX Runtime, {meta['input_size']} px {meta['resize']}")


def _save_anchor(path: Path, rows: list[TestRow], result: MethodResult) -> MethodResult:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": [r.key for r in rows], "note": result.note, "stamp": time.strftime("%Y-%m-%d %H:%M"),
                                "score_cost": asdict(result.score_cost), "scores": [asdict(s) for s in result.scores]}))
    return result


def _load_anchor(path: Path, rows: list[TestRow]) -> MethodResult | None:
    """Per-image scores saved by an earlier run, when it scored exactly these test rows."""
    from tasks.evaluation.metrics import ImageScore

    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["keys"] != [r.key for r in rows]:
        print(f"  {path} scored other test rows: recomputing")
        return None
    cost = saved["score_cost"]
    print(f"  reusing the per-image scores of {saved['stamp']} ({path})")
    return MethodResult(scores=[ImageScore(**s) for s in saved["scores"]],
                        score_cost=Cost(cost["wall_s"], cost["cpu_s"], cost["how"], tuple(cost["load"])),
                        note=f"{saved['note']} [scores reused from {saved['stamp']}]")


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

#: Test tables: the variant's key, its label, and which test keys it leaves out.
VARIANTS = (("all", "all test photos"),
            ("without_audit_flagged", "without the masks the cleaning's audit flagged (the gate's test split)"),
            ("without_excluded", "without --exclude-stems"))


def _summaries(result: MethodResult, cluster: str, drop: dict[str, set[str]]) -> dict[str, dict]:
    from tasks.evaluation.metrics import summarise

    mine = [s for s in result.scores if s.cluster == cluster]
    out = {"all": summarise(mine)} if mine else {}
    for variant, keys in drop.items():
        kept = [s for s in mine if s.stem not in keys]
        if keys and kept and len(kept) != len(mine):
            out[variant] = summarise(kept)
    return out


def _comparison(columns: dict[str, dict]) -> str:
    """Rows: the seed's measures; columns: the methods, then the seed."""
    names = list(columns)
    width = max(14, max(len(n) for n in names) + 2)
    lines = [f"{'':<22}" + "".join(f"{n:>{width}}" for n in names) + f"{'seed':>{width}}"]
    rows = [("mean IoU", lambda s: s["mean_iou"], SEED_TABLE["mean_iou"], 3)]
    rows += [(f"images ≥ {th * 100:g} % IoU", (lambda th: lambda s: s["share_at_least"][th])(th), SEED_TABLE[th], 1)
             for th in (0.95, 0.97, 0.99)]
    for label, get, seed, digits in rows:
        cells = "".join(f"{get(columns[n]) * 100:>{width - 2}.{digits}f} %" for n in names)
        lines.append(f"{label:<22}{cells}{seed * 100:>{width - 2}.{digits}f} %")
    lines.append(f"{'mean MAE':<22}" + "".join(f"{columns[n]['mean_mae']:>{width}.4f}" for n in names) + f"{'–':>{width}}")
    lines.append(f"{'mean boundary F':<22}" + "".join(f"{columns[n]['mean_boundary_f']:>{width}.4f}" for n in names)
                 + f"{'–':>{width}}")
    lines.append(f"{'n':<22}" + "".join(f"{columns[n]['n']:>{width}d}" for n in names))
    return "\n".join(lines)


def _also_method(path: Path) -> str:
    """The column of an ``--also-zero-shot`` file."""
    return f"zero-shot {path.stem}"


def _methods(args: argparse.Namespace) -> list[str]:
    """Every method's column, in table order."""
    return [*METHODS[:2], *(_also_method(p) for p in args.also_zero_shot), *METHODS[2:]]


def _cost_line(name: str, result: MethodResult, n_all: int) -> str:
    parts = [f"  {name:<11} scoring {result.score_cost.minutes()} for {n_all} test photos "
             f"({n_all / max(result.score_cost.wall_s, 1e-9):.2f} img/s wall), load at end "
             f"{'/'.join(f'{v:.1f}' for v in result.score_cost.load)}"]
    if result.train_cost is not None:
        parts.append(f"; training {result.train_cost.minutes()}")
    return "".join(parts)


def _accumulate_cost(path: Path, cost: Cost) -> Cost:
    """Training cost over every invocation of one run (a resumed run adds to what it cost before)."""
    before = json.loads(path.read_text()) if path.is_file() else {"wall_s": 0.0, "cpu_s": 0.0, "invocations": 0}
    total = {"wall_s": before["wall_s"] + cost.wall_s, "cpu_s": before["cpu_s"] + cost.cpu_s,
             "invocations": before["invocations"] + 1}
    path.write_text(json.dumps(total))
    how = cost.how + (f", summed over {total['invocations']} invocations of this run" if total["invocations"] > 1 else "")
    return Cost(total["wall_s"], total["cpu_s"], how, cost.load)


def _contact_sheet(model_url: str, rows: list[TestRow], worst: list[dict], path: Path, title: str) -> None:
    """A 4-column grid: per image, the photo with the mask outline (green) and the prediction's
    (red), and the prediction map with the mask outline, captioned with the stem and IoU."""
    import cv2
    import numpy as np

    from tasks.core.codecs import read_image, read_mask

    from tasks.evaluation.scoring import load_model, predict_probabilities

    model, meta = load_model(model_url)
    by_key = {r.key: r for r in rows}
    tiles = []
    height = 256
    for entry in worst:
        row = by_key[entry["stem"]]
        image, truth = read_image(row.image, None), read_mask(row.mask, None)
        prob = predict_probabilities(model, image, meta["input_size"], meta["resize"], (truth.shape[1], truth.shape[0]))
        pred = (prob > 0.5).astype(np.uint8)
        scale = height / image.shape[0]
        size = (max(1, round(image.shape[1] * scale)), height)
        photo = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), size, interpolation=cv2.INTER_AREA)
        pmap = cv2.cvtColor(cv2.resize((prob * 255).astype(np.uint8), size, interpolation=cv2.INTER_AREA),
                            cv2.COLOR_GRAY2BGR)
        t_small = cv2.resize((truth > 127).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        p_small = cv2.resize(pred, size, interpolation=cv2.INTER_NEAREST)
        t_contours, _ = cv2.findContours(t_small, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        p_contours, _ = cv2.findContours(p_small, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(photo, t_contours, -1, (0, 200, 0), 1)
        cv2.drawContours(photo, p_contours, -1, (0, 0, 255), 1)
        cv2.drawContours(pmap, t_contours, -1, (0, 200, 0), 1)
        tile = np.hstack([photo, np.full((height, 4, 3), 255, np.uint8), pmap])
        caption = np.full((22, tile.shape[1], 3), 255, np.uint8)
        label = f"{entry['stem']}  IoU {entry['iou'] * 100:.1f}%" + (f"  audit: {row.audit}" if row.audit else "")
        cv2.putText(caption, label, (4, 16),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([tile, caption]))
    if not tiles:
        return
    cols = 4
    tile_w = max(t.shape[1] for t in tiles)
    tile_h = tiles[0].shape[0]
    padded = [np.pad(t, ((0, 0), (0, tile_w - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    while len(padded) % cols:
        padded.append(np.full((tile_h, tile_w, 3), 255, np.uint8))
    grid = np.vstack([np.hstack([np.pad(t, ((4, 4), (4, 4), (0, 0)), constant_values=255) for t in padded[i:i + cols]])
                      for i in range(0, len(padded), cols)])
    header = np.full((30, grid.shape[1], 3), 255, np.uint8)
    cv2.putText(header, title, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack([header, grid]), [cv2.IMWRITE_JPEG_QUALITY, 85])


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from tasks.train.config import LOSSES, TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=DEFAULT_WORK, help="working folder (dataset, runs, MLflow, sheets)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="which sets of ../shared/data")
    parser.add_argument("--working-size", type=int, default=512, help="cleaning size (longer side)")
    parser.add_argument("--model", default="u2netp", choices=["u2netp", "u2net"],
                        help="u2net with --init pretrained needs `bgremoval pretrained fetch --model u2net` first")
    parser.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 5e-4 from pretrained, 2e-3 from scratch)")
    parser.add_argument("--loss", default="bce", choices=LOSSES)
    parser.add_argument("--train-seed", type=int, default=TrainConfig.seed,
                        help="the training's seed (sampler, augmentation): a second seed tells a change from noise")
    parser.add_argument("--workers", type=int, default=2, help="torch.distributed worker processes")
    parser.add_argument("--train-retries", type=int, default=2,
                        help="relaunch training this many times when it fails (e.g. killed from outside)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--audit", default="exclude", choices=["exclude", "keep"],
                        help="masks the cleaning's audit flags: out of training as in production (exclude), or "
                             "trained on (keep); the test tables are printed with and without them either way")
    parser.add_argument("--max-train", type=int, help="at most this many training pairs per set (quick runs)")
    parser.add_argument("--exclude-stems", help="text file of stems with broken masks: out of training, "
                                                "test tables with and without them")
    parser.add_argument("--max-test", type=int, help="at most this many test photos per set (quick checks only)")
    parser.add_argument("--reuse-anchors", action="store_true",
                        help="reuse the GrabCut / zero-shot per-image scores of an earlier run on the same test rows "
                             "(under --work/anchor-scores; their cost is reported as measured then)")
    parser.add_argument("--skip-grabcut", action="store_true")
    parser.add_argument("--skip-zero-shot", action="store_true")
    parser.add_argument("--also-zero-shot", type=Path, nargs="+", default=[], metavar="ONNX",
                        help="more rembg-family ONNX files scored as they are, each a column "
                             "'zero-shot <file stem>' (e.g. rembg's u2net.onnx)")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--flip", action="store_true",
                        help="also score the fine-tuned model with test-time flip (two forward passes per photo)")
    parser.add_argument("--run-name", help="training run name under --work/runs (default: a new one). The name of "
                                           "a stopped run resumes it from its last epoch; a finished run is not "
                                           "retrained, only scored, calibrated and registered again")
    parser.add_argument("--mlflow", help="MLflow tracking URI (default: SQLite under --work)")
    parser.add_argument("--model-name", default="bgremoval-u2netp-real", help="registered model name")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    missing = [s for s in args.sets if not (DATA / s).is_dir()]
    if missing:
        print(f"{', '.join(str(DATA / s) for s in missing)} not here: this benchmark needs ../shared/data", file=sys.stderr)
        return 2
    if args.init == "pretrained" and args.model == "u2net":
        from tasks.model.published import find_pretrained_onnx

        if find_pretrained_onnx(model="u2net") is None:
            parser.error("--model u2net --init pretrained needs the published U2-Net: "
                         "bgremoval pretrained fetch --model u2net")
    for name in ("max_train", "max_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    lr = args.lr if args.lr is not None else (5e-4 if args.init == "pretrained" else 2e-3)

    from tasks.evaluation.metrics import format_summary

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking = args.mlflow or f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    os.environ.setdefault("BGREMOVAL_MLFLOW_ARTIFACTS", str(work / "mlflow-artifacts"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"quality_real {stamp}: sets {', '.join(args.sets)}; load {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)

    started = time.time()
    dataset = _prepare(work, args.sets, args.working_size)
    excluded = _read_stems(args.exclude_stems)
    rows = _split_rows(dataset["manifest"])
    if args.max_test is not None:
        from tasks.data.splits import stem_uniform

        rows = sorted(rows, key=lambda r: (stem_uniform(r.stem, 0), r.stem))
        rows = sorted([r for c in {r.cluster for r in rows} for r in [x for x in rows if x.cluster == c][:args.max_test]],
                      key=lambda r: r.key)
        print(f"QUICK CHECK: only {args.max_test} test photos per set (--max-test)")
    if excluded:
        hits = sum(1 for r in rows if r.stem in excluded or r.key in excluded)
        print(f"--exclude-stems: {len(excluded)} stems, {hits} of them in the test split")
        excluded = excluded | {r.key for r in rows if r.stem in excluded}
    clusters = [SETS[s][0] for s in args.sets]
    print(_audit_counts(dataset["manifest"], clusters))
    drop = {"without_audit_flagged": {r.key for r in rows if r.audit}, "without_excluded": excluded}
    print(f"test split: {len(rows)} photos ("
          + ", ".join(f"{c} {sum(r.cluster == c for r in rows)}" for c in clusters) + "), scored at their own resolution",
          flush=True)

    results: dict[str, MethodResult] = {}
    extra: dict = {}
    run_url = None
    if not args.skip_finetune:
        from tasks.train.ddp import launch_local

        train_url, dropped = _train_dataset(dataset, args.max_train, excluded, args.audit)
        run_name = args.run_name or f"{args.model}-{args.init}-{args.input_size}px-{args.epochs}ep-{args.loss}-{stamp}"
        run_url = str(work / "runs" / run_name)
        init_url = None
        if args.init == "pretrained":
            from tasks.model.pretrained import write_pretrained_folder

            init_url = write_pretrained_folder(str(work / "init"), model=args.model)
        config = TrainConfig(
            dataset_url=train_url, output_url=run_url, model=args.model, epochs=args.epochs,
            batch_size=args.batch_size, lr=lr, input_size=args.input_size, loss=args.loss, init_from=init_url,
            warmup_epochs=0.3, channels_last=True, amp="auto", device=args.device, use_augmented=False,
            cache_dir=str(work / "cache"), mlflow_tracking_uri=tracking, mlflow_experiment="quality-real",
            mlflow_run_name=run_name, seed=args.train_seed,
        )
        (work / "runs").mkdir(exist_ok=True)
        log_path = work / "runs" / f"{run_name}.log"
        extra["train_log"] = str(log_path)
        print(f"\n== fine-tuning {args.model} from {args.init} at {args.input_size} px, {args.epochs} epochs, "
              f"loss {args.loss}, lr {lr:g}, {args.workers} workers × batch {args.batch_size}; train data {train_url} "
              f"(left out of train: {dropped}); log: {log_path}", flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        for attempt in range(args.train_retries + 1):
            try:  # a relaunch resumes from the run's last per-epoch checkpoint
                train_result = launch_local(config, nproc=args.workers,
                                      log_path=str(log_path.with_suffix(f".{attempt}.log") if attempt else log_path))
                break
            except RuntimeError as exc:
                if attempt == args.train_retries:
                    raise
                print(f"  training attempt {attempt + 1} failed ({str(exc).splitlines()[0]}); tail: "
                      f"{str(exc).strip().splitlines()[-1][:200]}; relaunching (resumes from the last checkpoint)",
                      flush=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        train_cost = Cost(wall_s=time.perf_counter() - wall,
                          cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                          how="getrusage(RUSAGE_CHILDREN): torchrun and its workers", load=os.getloadavg())
        train_cost = _accumulate_cost(work / "runs" / f"{run_name}.cost.json", train_cost)
        for epoch in train_result.history:
            print(f"  epoch {epoch['epoch']}: train loss {epoch['train_loss']:.4f}  val IoU "
                  f"{(epoch['val_iou'] or 0) * 100:.2f} % (clean val pairs)  "
                  f"{epoch['images'] / epoch['seconds']:.2f} img/s", flush=True)
        print(f"  training: {train_result.n_train} pairs, {train_result.images_per_s or 0:.2f} img/s over {train_result.world_size} "
              f"workers, {train_cost.minutes()}", flush=True)
        scores, score_cost, meta = _score_model(run_url, rows)
        results["fine-tuned"] = MethodResult(scores=scores, score_cost=score_cost, train_cost=train_cost,
                                             note=f"{run_url}, {meta['input_size']} px {meta['resize']}")
        print(_cost_line("fine-tuned", results["fine-tuned"], len(rows)), flush=True)
        if args.flip:
            scores, flip_cost, _ = _score_model(run_url, rows, flip=True)
            results["fine-tuned+flip"] = MethodResult(scores=scores, score_cost=flip_cost, train_cost=train_cost,
                                                      note="the same model, mean of the logits on the photo and its mirror")
            print(_cost_line("fine-tuned+flip", results["fine-tuned+flip"], len(rows)), flush=True)
        extra.update(history=train_result.history, n_train=train_result.n_train, train_images_per_s=train_result.images_per_s,
                     config=config.to_dict(), train_dataset_url=train_url, dropped_from_train=dropped)

    # the anchors after training: with --reuse-anchors a parallel --skip-finetune run may have saved them meanwhile
    anchors = {"grabcut": (args.skip_grabcut, "GrabCut", lambda: _run_grabcut(rows)),
               "zero-shot": (args.skip_zero_shot, "zero-shot: published U2-NetP", lambda: _run_zero_shot(rows))}
    from tasks.model.published import md5sum

    cache_names = {method: method for method in anchors}
    for path in args.also_zero_shot:
        anchors[_also_method(path)] = (False, f"zero-shot: {path}", partial(_run_zero_shot, rows, str(path)))
        cache_names[_also_method(path)] = f"{_also_method(path)}-{md5sum(path)[:12]}"  # two files, one stem: two caches
    for method, (skip, title, run) in anchors.items():
        if skip:
            continue
        print(f"\n== {title}", flush=True)
        cache = work / "anchor-scores" / f"{dataset['version']}-{cache_names[method]}.json"
        results[method] = (_load_anchor(cache, rows) if args.reuse_anchors else None) or _save_anchor(cache, rows, run())
        print(_cost_line(method, results[method], len(rows)), flush=True)

    # ---- tables ----
    load = os.getloadavg()
    print(f"\n==== results on the test split (photos and masks at their own resolution); "
          f"load now {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, {os.cpu_count()} CPUs")
    tables: dict = {}
    for set_name, cluster in zip(args.sets, clusters):
        per_method = {m: _summaries(results[m], cluster, drop) for m in _methods(args) if m in results}
        tables[set_name] = per_method
        for variant, label in VARIANTS:
            columns = {m: s[variant] for m, s in per_method.items() if variant in s}
            if not columns:
                continue
            if variant == "all":
                print(f"\n=== {set_name} ({cluster}), {label}")
                for method, summary in columns.items():
                    print(f"\n-- {method}: {results[method].note}")
                    print(format_summary(summary))
            print(f"\n{set_name}, {label}: the seed's table")
            print(_comparison(columns))
    print("\ncost (scoring: all test photos of every set together):")
    for method, result in results.items():
        print(_cost_line(method, result, len(rows)))
    print("  CPU time: " + "; ".join(sorted({r.score_cost.how for r in results.values()}
                                            | {r.train_cost.how for r in results.values() if r.train_cost})))

    # the worst test photos of the fine-tuned model (of the zero-shot model when there is none)
    sheets = {}
    sheet_method = "fine-tuned" if run_url else ("zero-shot" if "zero-shot" in results else None)
    if sheet_method:
        from tasks.model.published import require_pretrained_onnx

        sheet_model = run_url or str(require_pretrained_onnx())
        sheet_dir = work / "contact-sheets" / (Path(run_url).name if run_url else f"zero-shot-{stamp}")
        for set_name in args.sets:
            path = sheet_dir / f"{set_name}-worst16.jpg"
            _contact_sheet(sheet_model, rows, tables[set_name][sheet_method]["all"]["worst"], path,
                           f"{set_name}: 16 worst test photos, {sheet_method} (green: mask, red: prediction)")
            sheets[set_name] = str(path)
            print(f"contact sheet: {path}")

    calibration = registered = None
    if run_url is not None:
        from tasks import registry
        from tasks.serving.mlflow_model import pyfunc_model
        from tasks.evaluation.calibration import calibrate_model

        with _InProcess() as calib_cost:
            calibration = calibrate_model(run_url, extra["train_dataset_url"], target_iou=0.97)
        print("\n== production routing (calibrated on the clean val pairs, measured on the clean test pairs; "
              f"{calib_cost.minutes()})\n" + calibration["text"])
        ft = results["fine-tuned"].scores
        tags = {f"test_mean_iou_{c}": tables[s]["fine-tuned"]["all"]["mean_iou"] for s, c in zip(args.sets, clusters)}
        tags.update(test_mean_iou=float(sum(s.iou for s in ft) / len(ft)), dataset_version=dataset["version"],
                    data="+".join(args.sets), init=args.init)
        registered = registry.register_model(run_url, args.model_name, run_id=train_result.mlflow_run_id,
                                             tags=tags, pyfunc_model=pyfunc_model())
        registry.promote(args.model_name, registered["version"], reason="quality_real benchmark")
        print(f"\nregistered {registered['model_uri']} (alias champion) in {tracking}")
        print(f"score it elsewhere: MLFLOW_TRACKING_URI={tracking} bgremoval evaluate "
              f"--model models:/{args.model_name}@champion --images DIR --masks DIR")
    print(f"\ntotal {(time.time() - started) / 60:.1f} min wall; load {os.getloadavg()}")

    if args.json:
        def method_json(m: str, r: MethodResult) -> dict:
            return {"note": r.note, "score_cost": asdict(r.score_cost),
                    "train_cost": asdict(r.train_cost) if r.train_cost else None,
                    "scores": [asdict(s) for s in r.scores]}

        out = {"sets": args.sets, "dataset_version": dataset["version"], "dataset_url": dataset["dataset_url"],
               "splits": dataset["splits"], "excluded": sorted(excluded), "tables": tables,
               "audit_flagged_test": {r.key: r.audit for r in rows if r.audit},
               "methods": {m: method_json(m, r) for m, r in results.items()}, "load": os.getloadavg(),
               "routing": None if calibration is None else {k: v for k, v in calibration.items() if k != "text"},
               "model_uri": None if registered is None else registered["model_uri"], "contact_sheets": sheets,
               "seed": {str(k): v for k, v in SEED_TABLE.items()}, **extra}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
