"""Reviewer corrections: replayed from the log, validated, and applied to the manifest."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks import storage
from tasks.manifest import MANIFEST_COLUMNS, read_table, to_frame, write_table
from tasks.review import CorrectionError, apply_review, load_review_state, record_correction, thumbnail_jpeg


@pytest.fixture()
def clustered(tmp_path):
    """A dataset folder with 6 ok pairs, 1 quarantined row and a proposed 2-cluster assignment."""
    url = str(tmp_path / "ds")
    rows = [
        {"stem": f"s{i}", "key": f"k{i}", "status": "ok", "image_url": f"{url}/clean/images/k{i}.jpg"} for i in range(6)
    ] + [{"stem": "bad", "key": "bad", "status": "quarantined", "reason": "mask_empty"}]
    write_table(to_frame(rows, MANIFEST_COLUMNS), storage.join(url, "manifest.parquet"))
    assignments = pd.DataFrame(
        {
            "stem": [f"s{i}" for i in range(6)],
            "key": [f"k{i}" for i in range(6)],
            "cluster": [0, 0, 0, 1, 1, 1],
            "proposed_name": ["long_pants"] * 3 + ["shorts"] * 3,
            "distance": np.linspace(0, 1, 6),
        }
    )
    write_table(assignments, storage.join(url, "clusters", "assignments.parquet"))
    return url


def test_state_without_corrections_is_the_proposal(clustered):
    state = load_review_state(clustered)
    assert state.sizes() == {0: 3, 1: 3}
    assert state.names == {0: "long_pants", 1: "shorts"}
    assert state.moved() == {}


def test_corrections_are_logged_with_who_and_when_and_replayed(clustered):
    record_correction(clustered, "move", "alice", key="k0", to_cluster=1)
    record_correction(clustered, "rename", "bob", cluster=1, name="shorts & swim")
    lines = storage.read_bytes(storage.join(clustered, "review", "corrections.jsonl")).decode().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["user"] for e in entries] == ["alice", "bob"]
    assert entries[0]["action"] == "move" and entries[0]["key"] == "k0" and entries[0]["to_cluster"] == 1
    assert all(e["at"].endswith("+00:00") for e in entries)
    state = load_review_state(clustered)
    assert state.cluster_of["k0"] == 1 and state.names[1] == "shorts & swim"
    assert state.moved() == {"k0": (0, 1)}


@pytest.mark.parametrize(
    "action, fields, message",
    [
        ("move", {"key": "nope", "to_cluster": 1}, "unknown image key"),
        ("move", {"key": "k0", "to_cluster": 9}, "unknown cluster"),
        ("rename", {"cluster": 0, "name": ""}, "must be 1-60"),
        ("rename", {"cluster": 0, "name": "shorts"}, "already named"),
        ("delete", {}, "unknown action"),
    ],
)
def test_invalid_corrections_are_refused_and_not_written(clustered, action, fields, message):
    with pytest.raises(CorrectionError, match=message):
        record_correction(clustered, action, "mallory", **fields)
    assert not storage.exists(storage.join(clustered, "review", "corrections.jsonl"))


def test_apply_review_writes_final_labels_into_the_manifest(clustered):
    record_correction(clustered, "move", "alice", key="k4", to_cluster=0)
    record_correction(clustered, "rename", "alice", cluster=0, name="trousers")
    summary = apply_review(clustered)
    assert summary == {
        "sizes": {"shorts": 2, "trousers": 4},
        "moved": 1,
        "renamed": 1,
        "corrections": 2,
        "manifest_url": storage.join(clustered, "manifest.parquet"),
    }
    manifest = read_table(storage.join(clustered, "manifest.parquet")).set_index("key")
    assert manifest.loc["k4", "cluster"] == "trousers" and manifest.loc["k3", "cluster"] == "shorts"
    assert pd.isna(manifest.loc["bad", "cluster"])
    final = read_table(storage.join(clustered, "clusters", "final.parquet")).set_index("key")
    assert final.loc["k4", "proposed_cluster"] == 1 and final.loc["k4", "cluster"] == 0


def test_unclustered_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not been clustered"):
        load_review_state(str(tmp_path))


def test_thumbnail_has_outline_and_size():
    import cv2

    image = np.full((320, 240, 3), 255, np.uint8)
    mask = np.zeros((320, 240), np.uint8)
    mask[80:240, 60:180] = 255
    thumb = thumbnail_jpeg(cv2.imencode(".jpg", image)[1].tobytes(), cv2.imencode(".png", mask)[1].tobytes(), size=160)
    decoded = cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[:2] == (160, 120)
    magenta = (decoded[:, :, 0] > 150) & (decoded[:, :, 1] < 120) & (decoded[:, :, 2] > 150)
    assert magenta.sum() > 100
