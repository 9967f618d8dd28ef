"""Train / val / test splits, stratified by product cluster and stable across dataset versions.

Rules, in order:

1. Only clean pairs (``status == "ok"``) get a split; every other row gets ``<NA>``.
2. **Once assigned, a stem's split never changes.** A stem found in ``previous`` (the ``stem`` and
   ``split`` columns of an earlier version's manifest) keeps that split, whatever its cluster is now
   and however many pairs were added. This is what keeps a test image out of every later training
   set, so a later version must always be split with the earlier version as ``previous``.
3. Stems new in this version are split inside each cluster. Each stem gets a number
   ``u = sha256("<seed>:<stem>") -> [0, 1)``, independent of every other stem. The cluster's target
   counts (old and new members together, at the configured fractions, largest remainder, at least
   one ``val`` and one ``test`` member in a cluster of three or more) minus what the kept stems
   already hold give the places left per split; the new stems, in order of ``u``, fill ``train``
   first, then ``val``, then ``test``. So low ``u`` means train, as with the plain rule "compare ``u``
   to the cumulative fractions", but a cluster of five still gets a val and a test member, and each
   cluster holds its fractions exactly.

Without ``previous`` the assignment is a pure function of (seed, the cluster's stems): adding pairs
shifts the cut points a little, so most old stems keep their split but a few near a cut can move.
That is why rule 2 exists.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from tasks.core import layout
from tasks.core.manifest import STATUS_OK, read_table, write_table
from tasks.data.config import SplitConfig

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Stratum used for clean rows without a cluster (before the review stage).
NO_CLUSTER = "<none>"


def stem_uniform(stem: str, seed: int) -> float:
    """A number in ``[0, 1)`` from ``sha256("<seed>:<stem>")``; the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{stem}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def target_counts(n: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split ``n`` members at ``fractions`` (largest remainder); returns ``[train, val, test]``.

    A cluster of three or more gets at least one member in every split with a non-zero fraction,
    taken from the currently largest split.
    """
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    if n >= 3:
        for index in (1, 2, 0):
            if fractions[index] > 0 and counts[index] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[index] += 1
    return counts


def _fill_places(places: np.ndarray, n_new: int) -> np.ndarray:
    """Share ``n_new`` stems over the splits in proportion to their free ``places``.

    ``places`` (targets minus kept members) sums to ``n_new``; clipping the negative entries of a
    split the kept stems over-fill can only make the sum larger, so the share is always possible.
    """
    places = np.maximum(places, 0)
    if int(places.sum()) == n_new:
        return places
    exact = places * (n_new / places.sum())
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n_new - int(counts.sum())]] += 1
    return counts


def _split_new(new_stems: list[str], kept: pd.Series, config: SplitConfig) -> dict[str, str]:
    """Splits for one cluster's new stems, given the splits its kept stems already hold."""
    targets = target_counts(len(new_stems) + len(kept), config.fractions())
    held = np.array([int((kept == name).sum()) for name in SPLITS])
    counts = _fill_places(targets - held, len(new_stems))
    ordered = sorted(new_stems, key=lambda s: (stem_uniform(s, config.seed), s))
    labels = np.repeat(np.array(SPLITS), counts)
    return dict(zip(ordered, labels.tolist(), strict=True))


def _previous_splits(previous: pd.DataFrame | None) -> dict[str, str]:
    """``stem -> split`` from an earlier version's table (rows without a valid split ignored)."""
    if previous is None or not len(previous):
        return {}
    table = previous.loc[previous["split"].isin(SPLITS), ["stem", "split"]].astype(str)
    duplicated = table.groupby("stem")["split"].nunique()
    if (duplicated > 1).any():
        raise ValueError(f"previous splits put stems in two splits: {sorted(duplicated[duplicated > 1].index)[:5]}")
    return dict(zip(table["stem"], table["split"], strict=True))


def _strata(manifest: pd.DataFrame) -> pd.Series:
    """The cluster of every row as a string, :data:`NO_CLUSTER` where it is missing."""
    if "cluster" not in manifest.columns:
        return pd.Series(NO_CLUSTER, index=manifest.index, dtype="string")
    return manifest["cluster"].astype("string").fillna(NO_CLUSTER)


def assign_splits(manifest: pd.DataFrame, config: SplitConfig, previous: pd.DataFrame | None = None) -> pd.Series:
    """Assign ``train`` / ``val`` / ``test`` to every clean row of ``manifest``.

    Takes a manifest (``stem``, ``status``, ``cluster``), the config, and optionally ``previous``, a
    table with ``stem`` and ``split`` from an earlier dataset version whose assignments are kept.
    Returns a string Series named ``split`` aligned with ``manifest.index``: a split for every
    ``ok`` row, ``<NA>`` for the others. Raises ``ValueError`` when a stem appears twice among the
    clean rows or ``previous`` puts one stem in two splits.
    """
    out = pd.Series(pd.NA, index=manifest.index, dtype="string", name="split")
    ok = manifest["status"] == STATUS_OK
    stems = manifest.loc[ok, "stem"].astype(str)
    if stems.duplicated().any():
        raise ValueError(f"stems must be unique among clean rows: {sorted(stems[stems.duplicated()])[:5]}")
    kept = _previous_splits(previous)
    strata = _strata(manifest)[ok]
    for cluster in sorted(strata.unique()):
        members = stems[strata == cluster]
        old = members[members.isin(kept.keys())]
        new = members[~members.isin(kept.keys())]
        old_splits = old.map(kept)
        out.loc[old.index] = old_splits.to_numpy()
        assigned = _split_new(new.tolist(), old_splits, config)
        out.loc[new.index] = new.map(assigned).to_numpy()
    return out


def split_summary(manifest_with_splits: pd.DataFrame) -> pd.DataFrame:
    """Count clean rows per cluster and split.

    Takes a manifest with ``cluster`` and ``split`` columns. Returns a DataFrame indexed by cluster
    (sorted) with integer columns ``train``, ``val``, ``test`` and ``total``; rows without a split
    are not counted.
    """
    rows = manifest_with_splits[manifest_with_splits["split"].isin(SPLITS)]
    strata = _strata(rows)
    table = pd.crosstab(strata, rows["split"].astype(str)) if len(rows) else pd.DataFrame()
    table = table.reindex(columns=list(SPLITS), fill_value=0).fillna(0).astype(int)
    table.index.name = "cluster"
    table.columns.name = None
    table["total"] = table.sum(axis=1)
    return table.sort_index()


def format_split_summary(summary: pd.DataFrame) -> str:
    """Render :func:`split_summary` as a fixed-width table with a total line."""
    header = f"  {'cluster':<24}" + "".join(f"{c:>8}" for c in (*SPLITS, "total"))
    lines = ["splits", header]
    for cluster, row in summary.iterrows():
        lines.append(f"  {str(cluster):<24}" + "".join(f"{int(row[c]):>8}" for c in (*SPLITS, "total")))
    totals = summary.sum(axis=0) if len(summary) else pd.Series(0, index=[*SPLITS, "total"])
    lines.append(f"  {'total':<24}" + "".join(f"{int(totals[c]):>8}" for c in (*SPLITS, "total")))
    return "\n".join(lines)


def _with_own_splits(manifest: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame | None:
    """``previous`` (stem, split) plus the manifest's own assigned splits for the stems it lacks."""
    own = manifest.loc[manifest["split"].isin(SPLITS), ["stem", "split"]]
    if previous is None:
        return own
    given = previous.loc[previous["split"].isin(SPLITS), ["stem", "split"]]
    return pd.concat([given, own[~own["stem"].isin(given["stem"])]], ignore_index=True)


def split_dataset(
    dataset_url: str,
    config: SplitConfig,
    previous_url: str | None = None,
    storage_options: dict | None = None,
    keep_own: bool = True,
) -> dict:
    """Write the splits into ``<dataset_url>/manifest.parquet`` (its ``split`` column).

    Takes the dataset URL, the config, and optionally the URL of an earlier version's manifest
    whose assignments are kept. With ``keep_own`` (the default) the version's own assignments are
    kept too, for the pairs the earlier manifest does not place: splitting a version again never
    moves a pair, so a test split (perhaps carried from an earlier version) never leaks into
    training; only unassigned pairs are split by the hash. ``keep_own=False`` splits anew.
    Returns ``{"manifest_url", "counts": {cluster: {split: n}}, "totals": {split: n},
    "kept_from_previous": n, "kept_own": bool}`` (``n``: clean pairs that kept a split, from either
    source; ``kept_own``: the version had splits of its own and they were kept).
    """
    manifest_url = layout.manifest(dataset_url)
    manifest = read_table(manifest_url, storage_options)
    previous = read_table(previous_url, storage_options) if previous_url else None
    kept_own = keep_own and "split" in manifest.columns and bool(manifest["split"].isin(SPLITS).any())
    if kept_own:
        previous = _with_own_splits(manifest, previous)
    manifest["split"] = assign_splits(manifest, config, previous)
    write_table(manifest, manifest_url, storage_options)
    summary = split_summary(manifest)
    kept = 0
    if previous is not None:
        known = manifest["stem"].isin(previous.loc[previous["split"].isin(SPLITS), "stem"])
        kept = int((known & (manifest["status"] == STATUS_OK)).sum())
    return {
        "manifest_url": manifest_url,
        "counts": {str(c): {s: int(row[s]) for s in SPLITS} for c, row in summary.iterrows()},
        "totals": {s: int(summary[s].sum()) for s in SPLITS},
        "kept_from_previous": kept,
        "kept_own": kept_own,
    }
