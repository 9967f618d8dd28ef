"""The dataset manifest and quarantine tables (Parquet), and the dataset version.

``manifest.parquet`` has one row per candidate pair (kept or quarantined); ``quarantine.parquet``
holds the rejected rows only, each with a reason code. Both are read and written through fsspec.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import pandas as pd

from tasks.core import storage

#: Columns of ``manifest.parquet`` in order; ``cluster`` and ``split`` are filled by later stages.
MANIFEST_COLUMNS = (
    "stem",
    "key",
    "batch",
    "image_source",
    "mask_source",
    "image_sha256",
    "mask_sha256",
    "image_bytes",
    "orig_width",
    "orig_height",
    "width",
    "height",
    "fg_fraction",
    "ambiguous_fraction",
    "conversions",
    "image_url",
    "mask_url",
    "status",
    "reason",
    "detail",
    "cluster",
    "split",
    "audit_reasons",
    "audit_decision",
)

#: Columns of ``quarantine.parquet``.
QUARANTINE_COLUMNS = ("stem", "batch", "image_source", "mask_source", "reason", "detail")

STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"

#: A reviewer's answers to a flagged mask (``audit_decision``): use it as it is, leave the pair
#: out of training and the test split, or use the mask the reviewer uploaded instead.
AUDIT_KEEP = "keep"
AUDIT_EXCLUDE = "exclude"
AUDIT_FIXED = "fixed"
AUDIT_DECISIONS = (AUDIT_KEEP, AUDIT_EXCLUDE, AUDIT_FIXED)

_INT_COLUMNS = ("image_bytes", "orig_width", "orig_height", "width", "height")
_FLOAT_COLUMNS = ("fg_fraction", "ambiguous_fraction")


def to_frame(rows: list[dict], columns: tuple[str, ...]) -> pd.DataFrame:
    """Build a DataFrame with exactly ``columns`` (missing values as nulls, stable dtypes)."""
    return conform(pd.DataFrame([{col: row.get(col) for col in columns} for row in rows], columns=list(columns)),
                   columns)


def conform(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """``frame`` with exactly ``columns``, in that order (one it lacks is all null), each in its
    stable dtype (``Int64``, ``Float64`` or ``string``), on a fresh 0..n-1 index: what
    :func:`to_frame` gives for the frame's rows (for manifest and shard tables, which hold those
    dtypes already, the same frame), converted column by column instead of through a dict per row
    (a batch's manifest holds a row per pair). One difference: numbers in a text column are written
    as they are held (an object column's ``1`` as ``"1"``, where the rows' frame would have made it
    ``1.0`` first). Raises ValueError on duplicate column names."""
    if frame.columns.has_duplicates:
        raise ValueError(f"duplicate columns: {sorted(set(frame.columns[frame.columns.duplicated()]))}")
    index = pd.RangeIndex(len(frame))
    out = {}
    for col in columns:
        values = pd.Series(frame[col].to_numpy(), index=index) if col in frame else pd.Series(None, index=index,
                                                                                               dtype=object)
        if col in _INT_COLUMNS:
            out[col] = values.astype("Int64")
        elif col in _FLOAT_COLUMNS:
            out[col] = values.astype("Float64")
        else:
            out[col] = values.astype("string")
    return pd.DataFrame(out, index=index)


def audit_flagged(frame: pd.DataFrame) -> pd.Series:
    """True for rows whose mask the audit flagged (``audit_reasons`` not empty); manifests written
    before the audit existed have no flags."""
    if "audit_reasons" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["audit_reasons"].fillna("").astype(str) != ""


def audit_excluded(frame: pd.DataFrame) -> pd.Series:
    """True for rows left out of training and of the gate's test split: flagged by the mask audit
    and not kept or fixed by a reviewer."""
    flagged = audit_flagged(frame)
    if "audit_decision" not in frame:
        return flagged
    return flagged & ~frame["audit_decision"].fillna("").astype(str).isin([AUDIT_KEEP, AUDIT_FIXED])


def write_table(frame: pd.DataFrame, url: str, storage_options: dict | None = None) -> str:
    """Write ``frame`` as Parquet to ``url`` atomically and return ``url``."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return storage.write_bytes(url, buf.getvalue(), storage_options)


def read_table(url: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Read the Parquet table at ``url``."""
    return pd.read_parquet(io.BytesIO(storage.read_bytes(url, storage_options)))


def dataset_version(batch: str, listing: list[tuple[str, int, str]], config: dict) -> str:
    """Return a version id that changes only when the batch's files or the cleaning config change.

    ``listing`` holds ``(relative path, size, etag or "")`` for every file of the batch; ``config``
    the cleaning's settings (the caller adds the cleaning code's revision to them). The same
    batch cleaned twice with the same config gets the same version, so a re-run overwrites its own
    outputs instead of adding a second dataset.
    """
    payload = json.dumps({"listing": sorted(listing), "config": config}, sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", batch).strip("-") or "batch"
    return f"{slug}-{digest}"
