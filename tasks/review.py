"""The reviewers' corrections to the proposed product clusters, and their application.

Clustering proposes a cluster (an integer) and a name per cluster. Reviewers move images between
clusters and rename clusters; every change is one line of ``review/corrections.jsonl`` (who, when,
what). The review state is the proposal with the corrections replayed in order, so the log is the
single source of truth and nothing a reviewer did is lost. After approval, :func:`apply_review`
writes the final product type of every clean pair into the manifest's ``cluster`` column.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pandas as pd

from tasks import storage
from tasks.manifest import STATUS_OK, read_table, write_table

CORRECTIONS_PATH = "review/corrections.jsonl"
ASSIGNMENTS_PATH = "clusters/assignments.parquet"
FINAL_PATH = "clusters/final.parquet"
_NAME_PATTERN = re.compile(r"^[\w][\w &/+.,'()-]{0,59}$")
_write_lock = threading.Lock()


class CorrectionError(ValueError):
    """A correction that cannot be applied (unknown image or cluster, bad name)."""


@dataclass(frozen=True)
class Correction:
    """One reviewer action: ``move`` an image to a cluster, or ``rename`` a cluster."""

    action: str
    user: str
    at: str
    key: str | None = None
    to_cluster: int | None = None
    cluster: int | None = None
    name: str | None = None

    def to_json(self) -> str:
        """One JSON line for ``corrections.jsonl``."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


@dataclass
class ReviewState:
    """Clusters as the reviewers currently see them.

    ``cluster_of`` maps each image key to its cluster; ``names`` each cluster to its name;
    ``stems`` each key to its original stem; ``proposed`` the clustering's original assignment.
    """

    cluster_of: dict[str, int]
    names: dict[int, str]
    stems: dict[str, str]
    proposed: dict[str, int]
    corrections: list[Correction] = field(default_factory=list)

    def members(self, cluster: int) -> list[str]:
        """Keys in ``cluster``, sorted."""
        return sorted(k for k, c in self.cluster_of.items() if c == cluster)

    def sizes(self) -> dict[int, int]:
        """Number of images per cluster (every cluster listed, also an emptied one)."""
        counts = {c: 0 for c in self.names}
        for c in self.cluster_of.values():
            counts[c] += 1
        return counts

    def moved(self) -> dict[str, tuple[int, int]]:
        """Keys whose cluster differs from the proposal: ``key -> (proposed, now)``."""
        return {k: (self.proposed[k], c) for k, c in self.cluster_of.items() if self.proposed[k] != c}

    def apply(self, correction: Correction) -> None:
        """Apply one correction in place; raises :class:`CorrectionError` when it does not fit."""
        if correction.action == "move":
            if correction.key not in self.cluster_of:
                raise CorrectionError(f"unknown image key {correction.key!r}")
            if correction.to_cluster not in self.names:
                raise CorrectionError(f"unknown cluster {correction.to_cluster!r}; clusters are {sorted(self.names)}")
            self.cluster_of[correction.key] = int(correction.to_cluster)
        elif correction.action == "rename":
            if correction.cluster not in self.names:
                raise CorrectionError(f"unknown cluster {correction.cluster!r}; clusters are {sorted(self.names)}")
            name = (correction.name or "").strip()
            if not _NAME_PATTERN.match(name):
                raise CorrectionError(
                    f"cluster name {correction.name!r} must be 1-60 characters: letters, digits, spaces and &/+.,'()-"
                )
            taken = {n for c, n in self.names.items() if c != correction.cluster}
            if name in taken:
                raise CorrectionError(f"another cluster is already named {name!r}")
            self.names[int(correction.cluster)] = name
        else:
            raise CorrectionError(f"unknown action {correction.action!r}: use 'move' or 'rename'")
        self.corrections.append(correction)


def _read_corrections(dataset_url: str, storage_options: dict | None) -> list[Correction]:
    url = storage.join(dataset_url, CORRECTIONS_PATH)
    if not storage.exists(url, storage_options):
        return []
    lines = storage.read_bytes(url, storage_options).decode("utf-8").splitlines()
    return [Correction(**json.loads(line)) for line in lines if line.strip()]


def load_review_state(dataset_url: str, storage_options: dict | None = None) -> ReviewState:
    """Read the proposed clusters and replay every saved correction; returns the :class:`ReviewState`.

    Raises ``FileNotFoundError`` when the dataset has not been clustered yet.
    """
    assignments_url = storage.join(dataset_url, ASSIGNMENTS_PATH)
    if not storage.exists(assignments_url, storage_options):
        raise FileNotFoundError(f"{assignments_url} does not exist: the dataset has not been clustered yet")
    table = read_table(assignments_url, storage_options)
    proposed = {str(k): int(c) for k, c in zip(table["key"], table["cluster"], strict=True)}
    names = {int(c): str(n) for c, n in table.groupby("cluster")["proposed_name"].first().items()}
    state = ReviewState(
        cluster_of=dict(proposed),
        names=names,
        stems=dict(zip(table["key"].astype(str), table["stem"].astype(str), strict=True)),
        proposed=proposed,
    )
    for correction in _read_corrections(dataset_url, storage_options):
        state.apply(correction)
    return state


def record_correction(
    dataset_url: str,
    action: str,
    user: str,
    storage_options: dict | None = None,
    **fields,
) -> ReviewState:
    """Validate a reviewer's action against the current state and append it to the log.

    Takes the dataset URL, ``action`` (``move`` with ``key`` and ``to_cluster``, or ``rename`` with
    ``cluster`` and ``name``) and the reviewer's user name. Returns the new state; raises
    :class:`CorrectionError` for an action that does not fit (nothing is written then).
    """
    correction = Correction(action=action, user=user, at=datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields)
    with _write_lock:  # one api-server process appends at a time; S3 has no append
        state = load_review_state(dataset_url, storage_options)
        state.apply(correction)
        url = storage.join(dataset_url, CORRECTIONS_PATH)
        previous = storage.read_bytes(url, storage_options) if storage.exists(url, storage_options) else b""
        storage.write_bytes(url, previous + (correction.to_json() + "\n").encode("utf-8"), storage_options)
    return state


def apply_review(dataset_url: str, storage_options: dict | None = None) -> dict:
    """Write the reviewed product type of every clean pair into ``manifest.parquet``.

    Also writes ``clusters/final.parquet`` (stem, key, proposed cluster, final cluster, final name).
    Returns ``{"sizes": {name: n}, "moved": n, "renamed": n, "corrections": n, "manifest_url"}``.
    """
    state = load_review_state(dataset_url, storage_options)
    manifest_url = storage.join(dataset_url, "manifest.parquet")
    manifest = read_table(manifest_url, storage_options)
    final_name = {key: state.names[c] for key, c in state.cluster_of.items()}
    ok = manifest["status"] == STATUS_OK
    missing = sorted(set(manifest.loc[ok, "key"]) - set(final_name))
    if missing:
        raise CorrectionError(f"{len(missing)} clean pairs have no cluster (e.g. {missing[:3]}); re-run clustering")
    manifest["cluster"] = manifest["cluster"].astype("string")
    manifest.loc[ok, "cluster"] = manifest.loc[ok, "key"].map(final_name)
    write_table(manifest, manifest_url, storage_options)

    final = pd.DataFrame(
        {
            "stem": [state.stems[k] for k in state.cluster_of],
            "key": list(state.cluster_of),
            "proposed_cluster": [state.proposed[k] for k in state.cluster_of],
            "cluster": list(state.cluster_of.values()),
            "name": [final_name[k] for k in state.cluster_of],
        }
    )
    write_table(final, storage.join(dataset_url, FINAL_PATH), storage_options)
    renamed = len({c.cluster for c in state.corrections if c.action == "rename"})
    sizes = final["name"].value_counts().sort_index()
    return {
        "sizes": {str(k): int(v) for k, v in sizes.items()},
        "moved": len(state.moved()),
        "renamed": renamed,
        "corrections": len(state.corrections),
        "manifest_url": manifest_url,
    }


def thumbnail_jpeg(image_bytes: bytes, mask_bytes: bytes, size: int = 160) -> bytes:
    """A JPEG thumbnail of a clean pair with the mask outline drawn on it (for review pages)."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    mask = cv2.imdecode(np.frombuffer(mask_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or mask is None:
        raise ValueError("clean pair does not decode")
    scale = size / max(image.shape[:2])
    dims = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.resize(image, dims, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, dims, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours((mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, (255, 0, 255), 1, lineType=cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("thumbnail encoding failed")
    return buf.tobytes()
