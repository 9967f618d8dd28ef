"""Where everything lives in the bucket: the one module that builds storage keys and Asset URIs.

Every stage, DAG, plugin page and development tool asks this module for a location instead of
joining path pieces by hand, so the layout (``../shared/DESIGN.md``, "Storage") is written down
once::

    raw/<batch>/images|masks/<stem>.*     a studio drop; raw/<batch>/_READY written last
    raw/<batch>/truth.csv                  the generator's ground truth (demo and tests only)
    datasets/<version>/manifest.parquet    plus clean/, quarantine.parquet, features/, clusters/,
                                           review/, augmented/
    training/<version>/<run>/              one training run: model.pt, config.json, result.json,
                                           checkpoint.pt, init/, report/
    incoming/<batch>/                      production photos awaiting background removal
    production/<batch>/shards|failed/      the inference DAG's bookkeeping
    published/                             cut-outs that passed the quality score
    corrections/queue|done/<item>/         doubtful cut-outs and what reviewers decided
    retraining-pool/                       pairs that feed the retraining DAG
    retraining/state.json                  which pool pairs the retraining DAG has used

Functions take the URL of the level above (``bucket_url`` is ``s3://<bucket>`` in production and
any fsspec URL in tests) and return a URL; nothing parses a URL back into its parts: callers that
need the parts (a page link) keep them. Files that one stage alone writes and reads (its scratch
``_work/``, the name of a shard or of an item's file) stay with that stage; what crosses a module
boundary is here.
"""

from __future__ import annotations

import re

from tasks.core import storage

DEFAULT_BUCKET = "bgremoval"

RAW = "raw"
DATASETS = "datasets"
#: A valid S3 bucket name (3-63 lower-case letters, digits, dots and hyphens).
BUCKET_NAME_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
#: What a batch (a folder under ``raw/`` or ``incoming/``) may be called: it becomes part of Airflow
#: run ids (at most 250 characters with their prefix), S3 keys and queue item ids.
BATCH_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"

TRAINING = "training"
INCOMING = "incoming"
PRODUCTION = "production"
PUBLISHED = "published"
CORRECTIONS_QUEUE = "corrections/queue"
CORRECTIONS_DONE = "corrections/done"
CORRECTIONS_INDEX = "corrections/index"
RETRAINING_POOL = "retraining-pool"
RETRAINING_STATE = "retraining/state.json"

READY_MARKER = "_READY"
STARTED_MARKER = "_STARTED"
MANIFEST = "manifest.parquet"
QUARANTINE = "quarantine.parquet"
MODEL_WEIGHTS = "model.pt"
MODEL_CONFIG = "config.json"
TRAIN_RESULT = "result.json"
CHECKPOINT = "checkpoint.pt"
#: Beside a model, what production reads: the routing threshold and the edge-refinement choice
#: (``tasks.evaluation.calibration`` writes both; the registry and the engines carry them along).
CALIBRATION_FILE = "quality.json"
REFINE_CHOICE_FILE = "refinement.json"
MODEL_SIDECARS = (CALIBRATION_FILE, REFINE_CHOICE_FILE)


def bucket_url(bucket: str) -> str:
    """``s3://<bucket>``: the root every other location hangs from."""
    return f"s3://{bucket}"


def asset_uri(bucket: str, area: str) -> str:
    """The Airflow Asset URI of a top-level area, e.g. ``s3://bgremoval/retraining-pool/``."""
    return f"{bucket_url(bucket)}/{area.strip('/')}/"


# --- studio drops -------------------------------------------------------------------------------

def raw_batch(bucket_url: str, batch: str) -> str:
    """The folder of one studio drop: ``raw/<batch>``."""
    return storage.join(bucket_url, RAW, batch)


def ready_key(batch: str, area: str = RAW) -> str:
    """The bucket-relative key of a drop's ready marker (what the S3 sensors wait for) in ``area``
    (``raw`` for studio drops, ``incoming`` for production drops).

    ``batch`` may be a Jinja expression (``"{{ params.batch }}"``) for a templated sensor field.
    """
    return f"{area}/{batch}/{READY_MARKER}"


def ready_marker(batch_url: str) -> str:
    """The URL of a drop's ready marker, written last by the uploader."""
    return storage.join(batch_url, READY_MARKER)


def batch_images(batch_url: str) -> str:
    """The photos of a drop (``raw/<batch>/images``; also ``incoming/<batch>``'s layout)."""
    return storage.join(batch_url, "images")


def batch_masks(batch_url: str) -> str:
    """The masks of a drop: ``raw/<batch>/masks/<stem>.png``."""
    return storage.join(batch_url, "masks")


def batch_truth(batch_url: str) -> str:
    """``truth.csv`` of a generated drop: the product type of each stem (demo and tests)."""
    return storage.join(batch_url, "truth.csv")


# --- dataset versions ---------------------------------------------------------------------------

def dataset(bucket_url: str, version: str) -> str:
    """The folder of one dataset version: ``datasets/<version>``."""
    return storage.join(bucket_url, DATASETS, version)


def manifest(dataset_url: str) -> str:
    """A dataset version's manifest: one row per pair (status, cluster, split, URLs)."""
    return storage.join(dataset_url, MANIFEST)


def dataset_summary(dataset_url: str) -> str:
    """``summary.json``: what the stage that built the version counted."""
    return storage.join(dataset_url, "summary.json")


def quarantine(dataset_url: str) -> str:
    """Every pair cleaning rejected, with its reason."""
    return storage.join(dataset_url, QUARANTINE)


def clean(dataset_url: str) -> str:
    """The cleaned pairs at working resolution."""
    return storage.join(dataset_url, "clean")


def features(dataset_url: str) -> str:
    """The feature shards (``features/shard-*.parquet``)."""
    return storage.join(dataset_url, "features")


def clusters(dataset_url: str) -> str:
    """Cluster assignments, names and contact sheets."""
    return storage.join(dataset_url, "clusters")


def review(dataset_url: str) -> str:
    """What reviewers changed (one object per correction and proposal, fixed masks)."""
    return storage.join(dataset_url, "review")


def augmented(dataset_url: str) -> str:
    """The augmented pairs and their parts."""
    return storage.join(dataset_url, "augmented")


# --- training runs ------------------------------------------------------------------------------

def run_name(run_id: str) -> str:
    """An Airflow run id made safe as one path segment (``manual__2026-…`` → ``manual__2026-…``)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id).strip("-")
    if not name:
        raise ValueError(f"run id {run_id!r} has no usable characters")
    return name


def training_runs(bucket_url: str, version: str) -> str:
    """The training runs of one dataset version: ``training/<version>``."""
    return storage.join(bucket_url, TRAINING, version)


def training_run(bucket_url: str, version: str, run: str) -> str:
    """The output folder of one training run: ``training/<version>/<run>``."""
    return storage.join(training_runs(bucket_url, version), run_name(run))


def initial_weights(run_url: str) -> str:
    """Where a run stages the weights it starts from."""
    return storage.join(run_url, "init")


def report(run_url: str) -> str:
    """A run's evaluation report folder (``report.html`` and its figures)."""
    return storage.join(run_url, "report")


def report_page(run_url: str) -> str:
    """A run's evaluation report page."""
    return storage.join(report(run_url), "report.html")


def model_weights(folder: str) -> str:
    """``model.pt`` of a model folder (a training run or a registered model's files)."""
    return storage.join(folder, MODEL_WEIGHTS)


def model_config(folder: str) -> str:
    """``config.json`` of a model folder: model name, widths, input size, resize mode."""
    return storage.join(folder, MODEL_CONFIG)


def model_folder(model_url: str) -> str:
    """The run folder of a model reference: the folder itself, or the folder of a model file
    (``.pt`` or ``.onnx``; ``.`` for a bare file name)."""
    url = model_url.rstrip("/")
    if not url.lower().endswith((".pt", ".onnx")):
        return model_url
    return url.rsplit("/", 1)[0] if "/" in url else "."


def train_result(folder: str) -> str:
    """``result.json`` of a training run."""
    return storage.join(folder, TRAIN_RESULT)


def checkpoint(folder: str) -> str:
    """The latest epoch's checkpoint of a training run."""
    return storage.join(folder, CHECKPOINT)


# --- production ---------------------------------------------------------------------------------

def incoming(bucket_url: str, batch: str) -> str:
    """Production photos awaiting background removal: ``incoming/<batch>``."""
    return storage.join(bucket_url, INCOMING, batch)


def production(bucket_url: str, batch: str) -> str:
    """The inference DAG's bookkeeping for one batch: ``production/<batch>``."""
    return storage.join(bucket_url, PRODUCTION, batch)


def drop_started(bucket_url: str, batch: str) -> str:
    """Written when a drop's ``bgremoval_inference`` run has been started: ``production/<batch>/_STARTED``."""
    return storage.join(production(bucket_url, batch), STARTED_MARKER)


def published(bucket_url: str, batch: str) -> str:
    """Cut-outs of one batch that passed the quality score: ``published/<batch>`` (the batch keeps two
    drops with the same file names apart)."""
    return storage.join(bucket_url, PUBLISHED, batch)


def corrections_queue(bucket_url: str) -> str:
    """Doubtful cut-outs waiting for a person."""
    return storage.join(bucket_url, CORRECTIONS_QUEUE)


def corrections_index(bucket_url: str) -> str:
    """One empty key per queued item, ``<score>--<created_at>--<item_id>``: listing it gives the queue in
    its order (worst score first, then oldest) without reading the items."""
    return storage.join(bucket_url, CORRECTIONS_INDEX)


def corrections_done(bucket_url: str) -> str:
    """Decided correction items."""
    return storage.join(bucket_url, CORRECTIONS_DONE)


def retraining_pool(bucket_url: str) -> str:
    """Pairs (published, accepted or corrected) that feed the retraining DAG."""
    return storage.join(bucket_url, RETRAINING_POOL)


def retraining_state(bucket_url: str) -> str:
    """The retraining DAG's state: which pool pairs it has used, the last dataset version."""
    return storage.join(bucket_url, RETRAINING_STATE)
