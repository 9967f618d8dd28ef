"""Reviewer corrections: replayed from the log, validated, and applied to the manifest."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.core import storage
from tasks.data.ingest import clean_urls
from tasks.dev.badinputs import png_header_only
from tasks.core.manifest import MANIFEST_COLUMNS, audit_excluded, read_table, to_frame, write_table
from tasks.data.review import (
    MAX_FIXED_MASK_BYTES,
    CorrectionError,
    apply_review,
    fixed_mask_url,
    load_review_state,
    mask_review_summary,
    ReviewClosed,
    read_corrections,
    record_correction,
    save_fixed_mask,
    thumbnail_jpeg,
)


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
    entries = [json.loads(c.to_json()) for c in read_corrections(clustered)]
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
    assert read_corrections(clustered) == []


def test_apply_review_writes_final_labels_into_the_manifest(clustered):
    record_correction(clustered, "move", "alice", key="k4", to_cluster=0)
    record_correction(clustered, "rename", "alice", cluster=0, name="trousers")
    summary = apply_review(clustered)
    assert summary == {
        "sizes": {"shorts": 2, "trousers": 4},
        "moved": 1,
        "renamed": 1,
        "corrections": 2,
        "masks": {"flagged": 0, "kept": 0, "excluded": 0, "fixed": 0, "undecided": 0},
        "manifest_url": storage.join(clustered, "manifest.parquet"),
    }
    manifest = read_table(storage.join(clustered, "manifest.parquet")).set_index("key")
    assert manifest.loc["k4", "cluster"] == "trousers" and manifest.loc["k3", "cluster"] == "shorts"
    assert pd.isna(manifest.loc["bad", "cluster"])
    final = read_table(storage.join(clustered, "clusters", "final.parquet")).set_index("key")
    assert final.loc["k4", "proposed_cluster"] == 1 and final.loc["k4", "cluster"] == 0


def test_a_reject_is_recorded_and_leaves_the_review_open_until_an_approval(clustered, tmp_path):
    from tasks.data.review import clear_rejection, record_rejection, review_status

    assert review_status(str(tmp_path / "nothing")) == "no clusters" and review_status(clustered) == "waiting"
    record_rejection(clustered, None, None)  # the gate's timeout answered
    assert load_review_state(clustered).rejected["by"] == "the review's timeout"
    record_rejection(clustered, "lead", None)
    state = load_review_state(clustered)
    assert state.rejected["by"] == "lead" and not state.closed and review_status(clustered) == "rejected"
    record_correction(clustered, "move", "alice", key="k0", to_cluster=1)  # still taken, for the next run
    clear_rejection(clustered)  # the next run's gate asks again
    assert review_status(clustered) == "waiting" and load_review_state(clustered).rejected is None
    apply_review(clustered)
    assert review_status(clustered) == "approved"


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


# ---------------------------------------------------------------- flagged masks

W, H = 40, 30  # the clean pairs' size in the audited fixture


@pytest.fixture()
def audited(clustered):
    """``clustered`` with the audit's columns: k1, k4 and k5 flagged, the other clean pairs fine."""
    url = storage.join(clustered, "manifest.parquet")
    manifest = read_table(url)
    ok = manifest["status"] == "ok"
    manifest.loc[ok, "width"], manifest.loc[ok, "height"] = W, H
    manifest.loc[ok, "mask_url"] = [clean_urls(clustered, k)[1] for k in manifest.loc[ok, "key"]]
    manifest.loc[ok, "audit_reasons"] = ""
    manifest.loc[ok, "audit_decision"] = ""
    reasons = {"k1": "speckle,ragged", "k4": "holes", "k5": "edges,speckle"}
    manifest.loc[manifest["key"].isin(list(reasons)), "audit_reasons"] = manifest["key"].map(reasons)
    write_table(manifest, url)
    return clustered


def png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def good_mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[5:25, 10:30] = 255
    return mask


def test_flagged_pairs_come_from_the_manifest(audited):
    state = load_review_state(audited)
    assert state.flagged == {"k1": ("speckle", "ragged"), "k4": ("holes",), "k5": ("edges", "speckle")}
    assert state.mask_decisions == {}
    assert state.flagged_pairs()[0] == {
        "key": "k1", "stem": "s1", "reasons": ["speckle", "ragged"], "cluster": 0, "cluster_name": "long_pants",
        "size": f"{W}×{H}", "decision": "", "fixed_file": "", "decided_by": "", "decided_at": "",
    }


def test_mask_decisions_are_logged_and_the_last_one_wins(audited):
    record_correction(audited, "mask", "alice", key="k1", decision="keep")
    record_correction(audited, "mask", "bob", key="k4", decision="keep")
    record_correction(audited, "mask", "bob", key="k1", decision="exclude")
    entries = [json.loads(c.to_json()) for c in read_corrections(audited)]
    assert [(e["action"], e["user"], e["key"], e["decision"]) for e in entries] == [
        ("mask", "alice", "k1", "keep"), ("mask", "bob", "k4", "keep"), ("mask", "bob", "k1", "exclude")]
    state = load_review_state(audited)
    assert state.mask_decisions == {"k1": "exclude", "k4": "keep"}
    by_key = {p["key"]: p for p in state.flagged_pairs()}
    assert (by_key["k1"]["decision"], by_key["k1"]["decided_by"]) == ("exclude", "bob")
    assert by_key["k5"]["decision"] == ""
    assert state.moved() == {}  # mask decisions do not touch the clusters


@pytest.mark.parametrize(
    "key, decision, message",
    [
        ("nope", "keep", "unknown image key"),
        ("bad", "keep", "unknown image key"),  # quarantined
        ("k0", "keep", "not flagged"),
        ("k1", "maybe", "must be one of"),
        ("k1", None, "must be one of"),
        ("k1", "fix", "no corrected mask was uploaded"),
    ],
)
def test_invalid_mask_decisions_are_refused_and_not_written(audited, key, decision, message):
    with pytest.raises(CorrectionError, match=message):
        record_correction(audited, "mask", "mallory", key=key, decision=decision)
    assert read_corrections(audited) == []


def _fixed(dataset_url: str, key: str) -> str:
    """The URL of the upload the review's last fix of ``key`` chose."""
    return fixed_mask_url(dataset_url, key, load_review_state(dataset_url).fixed_masks[key])


def _uploads(dataset_url: str) -> list[str]:
    return [o.relpath for o in storage.list_objects(storage.join(dataset_url, "review", "masks"))]


@pytest.mark.parametrize("sixteen_bit", [False, True])
def test_fixed_mask_is_thresholded_stored_apart_and_recorded(audited, sixteen_bit):
    clean_mask_url = clean_urls(audited, "k1")[1]
    storage.write_bytes(clean_mask_url, png(np.zeros((H, W), np.uint8)))
    grey = np.zeros((H, W), np.uint8)
    grey[:, 10:20], grey[:, 20:30], grey[:, 30:] = 127, 128, 200
    upload = png(grey.astype(np.uint16) * 257) if sixteen_bit else png(grey)
    state = save_fixed_mask(audited, "k1", upload, "carol")
    assert state.mask_decisions == {"k1": "fix"}
    stored = cv2.imdecode(np.frombuffer(storage.read_bytes(_fixed(audited, "k1")), np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint8 and stored.shape == (H, W)
    assert set(np.unique(stored)) == {0, 255}
    assert (stored[:, :20] == 0).all() and (stored[:, 20:] == 255).all()
    assert _fixed(audited, "k1").startswith(storage.join(audited, "review", "masks", "k1-"))  # a file per upload
    assert not cv2.imdecode(np.frombuffer(storage.read_bytes(clean_mask_url), np.uint8), 0).any()  # clean mask untouched
    [entry] = [json.loads(c.to_json()) for c in read_corrections(audited)]
    assert (entry["action"], entry["key"], entry["decision"], entry["user"]) == ("mask", "k1", "fix", "carol")


def test_cut_out_with_transparency_uses_its_alpha(audited):
    rgba = np.zeros((H, W, 4), np.uint8)  # black pixels everywhere: only the alpha says where the product is
    rgba[..., 3] = good_mask()
    save_fixed_mask(audited, "k4", png(rgba), "carol")
    stored = cv2.imdecode(np.frombuffer(storage.read_bytes(_fixed(audited, "k4")), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(stored, good_mask())


def test_a_mask_drawn_on_the_full_size_photo_is_shrunk_to_the_clean_pair(audited):
    full = cv2.resize(good_mask(), (W * 3, H * 3), interpolation=cv2.INTER_NEAREST)  # the photo before cleaning
    save_fixed_mask(audited, "k4", png(full), "carol")
    stored = cv2.imdecode(np.frombuffer(storage.read_bytes(_fixed(audited, "k4")), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(stored, good_mask())
    with pytest.raises(CorrectionError, match="is 123x90 pixels .* same size or larger with the same aspect ratio"):
        save_fixed_mask(audited, "k1", png(np.full((90, 123), 255, np.uint8)), "carol")  # 2.5 % wider


@pytest.mark.parametrize(
    "upload, message",
    [
        (png(np.full((H + 1, W), 255, np.uint8)), "is 40x31 pixels .* same size"),
        (png_header_only(W + 1, H), "is 41x30 pixels but the clean pair is 40x30"),  # refused before decoding
        (png_header_only(60_000, 60_000), "far larger than the clean pair"),
        (png_header_only(W, H), "does not decode"),  # right size, broken pixels: only now decoded
        (cv2.imencode(".jpg", np.full((H, W, 3), 255, np.uint8))[1].tobytes(), "not a PNG"),
        (b"GIF89a" + b"\0" * 100, "not a PNG"),
        (b"", "not a PNG"),
        (png(np.zeros((H, W), np.uint8)), "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_FIXED_MASK_BYTES, "larger than 20 MiB"),
    ],
    ids=["wrong-size", "wrong-size-header", "huge-header", "broken-pixels", "jpeg", "gif", "empty-file", "no-foreground", "too-big"],
)
def test_unfit_uploads_are_refused_and_nothing_is_written(audited, upload, message):
    with pytest.raises(CorrectionError, match=message):
        save_fixed_mask(audited, "k1", upload, "mallory")
    assert _uploads(audited) == []
    assert read_corrections(audited) == []


@pytest.mark.parametrize("key, message", [("k0", "not flagged"), ("../../raw/x", "unknown image key")])
def test_fix_needs_a_flagged_key(audited, key, message):
    with pytest.raises(CorrectionError, match=message):
        save_fixed_mask(audited, key, png(good_mask()), "mallory")
    assert list(storage.list_objects(storage.join(audited, "review"))) == []


def test_apply_review_writes_audit_decisions_and_fixed_mask_urls(audited):
    before = read_table(storage.join(audited, "manifest.parquet")).set_index("key")
    record_correction(audited, "mask", "alice", key="k1", decision="exclude")
    save_fixed_mask(audited, "k4", png(good_mask()), "alice")
    summary = apply_review(audited)
    assert summary["masks"] == {"flagged": 3, "kept": 0, "excluded": 1, "fixed": 1, "undecided": 1}
    assert summary["corrections"] == 2
    manifest = read_table(storage.join(audited, "manifest.parquet")).set_index("key")
    assert manifest.loc[["k1", "k4", "k5"], "audit_decision"].tolist() == ["exclude", "fixed", ""]
    assert manifest.loc["k4", "mask_url"] == _fixed(audited, "k4")
    assert manifest.loc["k1", "mask_url"] == before.loc["k1", "mask_url"]
    untouched = ["k0", "k2", "k3", "bad"]
    pd.testing.assert_frame_equal(
        manifest.loc[untouched, ["audit_reasons", "audit_decision", "mask_url"]],
        before.loc[untouched, ["audit_reasons", "audit_decision", "mask_url"]],
    )
    assert sorted(manifest.index[audit_excluded(manifest.reset_index()).to_numpy()]) == ["k1", "k5"]

    # Approval closed the review: a later change is refused, and applying again changes nothing.
    with pytest.raises(ReviewClosed):
        record_correction(audited, "mask", "bob", key="k4", decision="keep")
    with pytest.raises(ReviewClosed):
        save_fixed_mask(audited, "k5", png(good_mask()), "bob")
    assert [name for name in _uploads(audited) if name.startswith("k5")] == []
    assert apply_review(audited)["masks"] == summary["masks"]


def test_the_last_answer_before_approval_wins_and_a_fix_taken_back_is_not_used(audited):
    before = read_table(storage.join(audited, "manifest.parquet")).set_index("key")
    save_fixed_mask(audited, "k4", png(good_mask()), "alice")
    record_correction(audited, "mask", "bob", key="k4", decision="keep")
    summary = apply_review(audited)
    assert summary["masks"]["kept"] == 1 and summary["masks"]["fixed"] == 0
    manifest = read_table(storage.join(audited, "manifest.parquet")).set_index("key")
    assert manifest.loc["k4", "audit_decision"] == "keep"
    assert manifest.loc["k4", "mask_url"] == clean_urls(audited, "k4")[1] == before.loc["k4", "mask_url"]


def test_concurrent_reviewers_lose_no_correction_and_a_new_clustering_starts_a_new_log(clustered):
    from concurrent.futures import ThreadPoolExecutor

    def review(reviewer: int) -> None:
        for step in range(10):
            record_correction(clustered, "move", f"r{reviewer}", key=f"k{(reviewer + step) % 6}", to_cluster=step % 2)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(review, range(8)))
    kept = read_corrections(clustered)
    assert len(kept) == 80 and {c.user for c in kept} == {f"r{i}" for i in range(8)}
    # clustering the version again (another proposal) starts an empty log; the old one stays stored
    assignments = storage.join(clustered, "clusters", "assignments.parquet")
    table = read_table(assignments)
    table["proposed_name"] = table["proposed_name"].astype(str) + "-v2"
    write_table(table, assignments)
    assert read_corrections(clustered) == [] and load_review_state(clustered).moved() == {}


def test_two_reviewers_giving_two_clusters_one_name_at_once_cannot_break_the_review(clustered):
    from tasks.data.review import CorrectionError, _store_correction

    ann_sees, bob_sees = load_review_state(clustered), load_review_state(clustered)  # two requests at once
    _store_correction(clustered, ann_sees, "rename", "ann", None, cluster=0, name="Shoes")
    with pytest.raises(CorrectionError, match="already named 'Shoes'.*saved first"):
        _store_correction(clustered, bob_sees, "rename", "bob", None, cluster=1, name="Shoes")
    state = load_review_state(clustered)  # the log still replays: the first rename wins, the second is skipped
    assert state.names == {0: "Shoes", 1: "shorts"}
    assert [(c.user, reason) for c, reason in state.conflicts] == [("bob", "another cluster is already named 'Shoes'")]
    record_correction(clustered, "move", "cat", key="k0", to_cluster=1)  # later work goes on
    assert apply_review(clustered)["sizes"] == {"Shoes": 2, "shorts": 4}


def test_a_change_saved_while_the_review_is_approved_is_refused_not_silently_lost(clustered):
    from tasks.data.review import _store_correction

    seen = load_review_state(clustered)  # the request validated against the open review ...
    apply_review(clustered)  # ... Approve was applied meanwhile ...
    with pytest.raises(ReviewClosed, match="approved while this change was being saved"):
        _store_correction(clustered, seen, "rename", "ann", None, cluster=0, name="Late")  # ... then it saves
    assert read_corrections(clustered) == [] and load_review_state(clustered).names[0] == "long_pants"


def test_a_change_saved_while_approve_reads_the_log_is_kept_when_it_was_read(clustered, monkeypatch):
    from tasks.data import review

    real_is_closed, armed, applied = review.is_closed, [], []

    def approve_in_between(*args):  # Approve runs after the object was written, before the writer checks
        if armed and not applied:
            applied.append(None)  # once: Approve reads the review state, which asks again
            applied[0] = apply_review(clustered)
        return real_is_closed(*args)

    monkeypatch.setattr(review, "is_closed", approve_in_between)
    seen = load_review_state(clustered)
    armed.append(True)
    state = review._store_correction(clustered, seen, "rename", "ann", None, cluster=0, name="Read in time")
    assert state.names[0] == "Read in time" and applied[0]["renamed"] == 1  # answered 200 and applied
    manifest = read_table(storage.join(clustered, "manifest.parquet"))
    assert set(manifest.loc[manifest["status"] == "ok", "cluster"]) == {"Read in time", "shorts"}


def test_old_manifest_without_audit_columns_still_works(clustered):
    url = storage.join(clustered, "manifest.parquet")
    write_table(read_table(url).drop(columns=["audit_reasons", "audit_decision"]), url)
    state = load_review_state(clustered)
    assert state.flagged == {} and state.flagged_pairs() == []
    with pytest.raises(CorrectionError, match="not flagged"):
        record_correction(clustered, "mask", "alice", key="k0", decision="keep")
    summary = apply_review(clustered)
    assert summary["masks"] == {"flagged": 0, "kept": 0, "excluded": 0, "fixed": 0, "undecided": 0}
    manifest = read_table(url)
    assert "audit_decision" not in manifest and "audit_reasons" not in manifest
    assert mask_review_summary(clustered) == {
        "flagged": 0, "reasons": {}, "decided": {"keep": 0, "exclude": 0, "fix": 0}, "undecided": 0}


def test_mask_review_summary_counts_reasons_and_decisions(audited):
    record_correction(audited, "mask", "alice", key="k5", decision="exclude")
    summary = mask_review_summary(audited)
    assert summary == {
        "flagged": 3,
        "reasons": {"speckle": 2, "edges": 1, "holes": 1, "ragged": 1},
        "decided": {"keep": 0, "exclude": 1, "fix": 0},
        "undecided": 2,
    }
    assert json.loads(json.dumps(summary)) == summary


def test_overlay_thumbnail_tints_the_background_holes_included():
    image = np.full((320, 240, 3), 255, np.uint8)
    mask = np.zeros((320, 240), np.uint8)
    mask[40:280, 40:200] = 255
    mask[140:180, 100:140] = 0  # a hole
    encoded = cv2.imencode(".jpg", image)[1].tobytes(), png(mask)
    plain = cv2.imdecode(np.frombuffer(thumbnail_jpeg(*encoded, size=160), np.uint8), cv2.IMREAD_COLOR)
    tinted = cv2.imdecode(np.frombuffer(thumbnail_jpeg(*encoded, size=160, overlay=True), np.uint8), cv2.IMREAD_COLOR)
    assert plain[5, 5, 1] > 240 and tinted[5, 5, 1] < 160  # background: white vs tinted magenta
    assert tinted[50, 60, 1] > 240  # product: untouched
    hole = tinted[70:90, 50:70]  # the hole is background too
    assert (hole[:, :, 1] < 160).mean() > 0.5


def test_a_page_load_lists_only_the_recent_part_of_a_long_log(clustered, monkeypatch):
    from datetime import datetime, timedelta, timezone

    from tasks.data import review

    for step in range(4):
        record_correction(clustered, "move", "ann", key=f"k{step}", to_cluster=1)
    asked = []
    real = storage.list_names_after
    monkeypatch.setattr(storage, "list_names_after", lambda folder, after, options: asked.append(after) or real(folder, after, options))
    # a slow writer on another process: named two minutes ago, visible only now
    late = (datetime.now(timezone.utc) - timedelta(seconds=120)).strftime("%Y%m%dT%H%M%S%f") + "-0123456789ab.json"
    folder = storage.join(review.review_log_url(clustered, load_review_state(clustered).clustering), "corrections")
    storage.write_text(storage.join(folder, late), review.Correction("move", "bob", "t", key="k5", to_cluster=0).to_json())
    state = load_review_state(clustered)
    assert len(state.corrections) == 5 and state.cluster_of["k5"] == 0  # seen, in name order
    assert asked and all(after > "" for after in asked)  # the store listed from the window on, not from the start
    review._listed_names.clear()  # a fresh process lists everything once
    assert len(read_corrections(clustered)) == 5 and asked[-1] == ""


def test_a_correction_whose_save_outlasts_the_listing_window_is_withdrawn(clustered, monkeypatch):
    from tasks.data import review

    monkeypatch.setattr(review, "LISTING_WINDOW_S", 0.0)  # every save "took too long"
    with pytest.raises(CorrectionError, match="took too long"):
        record_correction(clustered, "move", "ann", key="k0", to_cluster=1)
    monkeypatch.undo()
    assert read_corrections(clustered) == []


def test_an_upload_refused_as_the_review_closed_never_replaces_the_approved_fix(audited, monkeypatch):
    """Alice fixes k4; Bob's upload for k4 is being decoded when Approve is applied: Bob is told it was
    not kept, and the approved manifest points at Alice's mask, unchanged (each upload has its own file)."""
    import tasks.data.review as review

    save_fixed_mask(audited, "k4", png(good_mask()), "alice")
    alice = _fixed(audited, "k4")
    alices_bytes = storage.read_bytes(alice)
    decode = review._mask_array

    def approved_meanwhile(png_bytes, size):
        apply_review(audited)
        return decode(png_bytes, size)

    monkeypatch.setattr(review, "_mask_array", approved_meanwhile)
    bobs = good_mask().copy()
    bobs[:, :5] = 255
    with pytest.raises(ReviewClosed):
        save_fixed_mask(audited, "k4", png(bobs), "bob")
    manifest = read_table(storage.join(audited, "manifest.parquet")).set_index("key")
    assert manifest.loc["k4", "mask_url"] == alice and storage.read_bytes(alice) == alices_bytes
