"""Pair features on hand-made masks, and the feature stage on a small generated dataset."""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import pytest

from tasks.data import features, ingest
from tasks.core import storage
from tasks.data.cleaning import CleaningConfig
from tasks.data.features import FEATURE_NAMES, pair_features
from tasks.core.manifest import read_table, write_table
from tasks.dev.synth import SynthConfig, generate_catalogue


def _named(vector: np.ndarray) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, vector.tolist()))


def _image(mask: np.ndarray, product: int = 60, background: int = 250) -> np.ndarray:
    """A flat RGB photo: ``product`` grey where the mask is set, ``background`` elsewhere."""
    image = np.full((*mask.shape, 3), background, np.uint8)
    image[mask > 0] = product
    return image


def _pants() -> np.ndarray:
    mask = np.zeros((300, 200), np.uint8)
    mask[20:100, 50:150] = 255          # waist and seat
    mask[100:280, 50:95] = 255          # left leg
    mask[100:280, 105:150] = 255        # right leg, a 10 px gap between
    return mask


def _blob() -> np.ndarray:
    mask = np.zeros((300, 200), np.uint8)
    cv2.ellipse(mask, (100, 150), (70, 50), 0, 0, 360, 255, -1)
    return mask


def _tee() -> np.ndarray:
    mask = np.zeros((240, 240), np.uint8)
    mask[30:210, 70:170] = 255          # body
    mask[30:80, 20:220] = 255           # short sleeves sticking out at the top
    return mask


def test_vector_is_finite_float32_and_named() -> None:
    for mask in (_pants(), _blob(), _tee()):
        vector = pair_features(_image(mask), mask)
        assert vector.dtype == np.float32
        assert vector.shape == (len(FEATURE_NAMES),)
        assert np.isfinite(vector).all()
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)


def test_rectangle_has_its_aspect_area_and_fill() -> None:
    mask = np.zeros((200, 300), np.uint8)
    mask[50:150, 100:150] = 255         # 100 rows x 50 columns
    f = _named(pair_features(_image(mask), mask))
    assert f["aspect_log"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert f["area_fraction"] == pytest.approx(5000 / 60000, abs=1e-6)
    assert f["bbox_fill"] == pytest.approx(1.0)
    assert f["solidity"] == pytest.approx(1.0, abs=0.03)
    assert f["frame_span"] == pytest.approx(0.5)
    assert f["leg_gap"] == 0.0 and f["multi_run_share"] == 0.0
    assert f["sleeve_spread"] == pytest.approx(1.0)
    assert all(f[f"width_{i}"] == pytest.approx(1.0) for i in range(features.PROFILE_BANDS))


def test_two_legs_have_a_leg_gap_a_blob_does_not() -> None:
    pants, blob = _named(pair_features(_image(_pants()), _pants())), _named(pair_features(_image(_blob()), _blob()))
    assert pants["leg_gap"] > 0.9 and blob["leg_gap"] < 0.1
    assert pants["two_run_depth"] > 1.0 > blob["two_run_depth"]
    assert pants["aspect_log"] > 0 > blob["aspect_log"]


def test_short_sleeves_spread_the_top_third() -> None:
    tee = _named(pair_features(_image(_tee()), _tee()))
    rect = np.zeros((240, 240), np.uint8)
    rect[30:210, 70:170] = 255
    body = _named(pair_features(_image(rect), rect))
    assert tee["sleeve_spread"] == pytest.approx(2.0, abs=0.05)
    assert body["sleeve_spread"] == pytest.approx(1.0)


def test_dark_on_white_contrasts_more_than_white_on_white() -> None:
    mask = _blob()
    dark = _named(pair_features(_image(mask, product=30, background=250), mask))
    pale = _named(pair_features(_image(mask, product=240, background=250), mask))
    assert dark["contrast_lab"] > 50 > 10 > pale["contrast_lab"]
    assert dark["contrast_v"] > 0.8 > 0.1 > pale["contrast_v"]
    assert pale["product_lightness"] > 0.9 > 0.2 > dark["product_lightness"]
    assert pale["product_near_bg"] == pytest.approx(1.0) and dark["product_near_bg"] == 0.0
    assert dark["background_v_mean"] == pytest.approx(250 / 255, abs=1e-3)


def test_bad_pairs_raise_value_error() -> None:
    mask = _blob()
    with pytest.raises(ValueError, match="no product"):
        pair_features(_image(mask), np.zeros_like(mask))
    with pytest.raises(ValueError, match="do not form a pair"):
        pair_features(_image(mask)[:-1], mask)
    with pytest.raises(ValueError, match="could not be decoded"):
        features.decode_pair(b"not a jpeg", b"not a png")


def test_a_mask_covering_the_whole_image_still_gives_finite_features() -> None:
    mask = np.full((64, 48), 255, np.uint8)
    vector = pair_features(_image(mask), mask)
    assert np.isfinite(vector).all()


# --------------------------------------------------------------------------------------------
# The stage functions on a small generated dataset
# --------------------------------------------------------------------------------------------

def _dataset(root: str, n: int, seed: int) -> str:
    """Generate, plan, clean and finalize a catalogue under ``root``; return the dataset URL."""
    generate_catalogue(storage.join(root, "raw", "b"), SynthConfig(n=n, seed=seed, max_side=240))
    config = CleaningConfig(working_size=160)
    plan = ingest.plan_batch(root, "b", config, shard_size=50)
    results = [ingest.clean_shard(u, plan["dataset_url"], "b", config) for u in plan["shard_urls"]]
    ingest.finalize_dataset(plan["dataset_url"], "b", [r["result_url"] for r in results], plan["listing_rejects_url"])
    return plan["dataset_url"]


@pytest.fixture()
def small_dataset(tmp_path) -> str:
    return _dataset(str(tmp_path), n=14, seed=3)


def test_shards_cover_the_ok_rows_in_stem_order(small_dataset) -> None:
    plan = features.plan_feature_shards(small_dataset, shard_size=5)
    assert [p["shard"] for p in plan] == [0, 1, 2]
    assert [(p["start"], p["stop"]) for p in plan] == [(0, 5), (5, 10), (10, 14)]
    assert all(p["dataset_url"] == small_dataset for p in plan)

    results = [features.extract_shard_features(**p) for p in plan]
    assert [r["n"] for r in results] == [5, 5, 4] and all(r["skipped"] == 0 for r in results)
    tables = [read_table(r["features_url"]) for r in results]
    assert all(list(t.columns) == ["stem", "key", *FEATURE_NAMES] for t in tables)
    assert all((t[list(FEATURE_NAMES)].dtypes == np.float32).all() for t in tables)
    stems = [s for t in tables for s in t["stem"]]
    assert stems == sorted(stems) == sorted(features.ok_rows(small_dataset)["stem"])
    assert results[1]["features_url"].endswith("/features/shard-00001.parquet")
    assert np.isfinite(np.vstack([t[list(FEATURE_NAMES)].to_numpy() for t in tables])).all()


def test_a_corrupted_clean_image_is_skipped_not_fatal(small_dataset, caplog) -> None:
    ok = features.ok_rows(small_dataset)
    victim = ok.iloc[3]
    storage.write_bytes(victim["image_url"], b"\xff\xd8 garbage, not a JPEG any more")
    with caplog.at_level(logging.WARNING, logger="tasks.data.features"):
        result = features.extract_shard_features(small_dataset, shard=0, start=0, stop=len(ok))
    assert result["skipped"] == 1 and result["n"] == len(ok) - 1
    table = read_table(result["features_url"])
    assert victim["stem"] not in set(table["stem"]) and len(table) == len(ok) - 1
    assert victim["stem"] in caplog.text


def test_plan_of_a_dataset_without_clean_pairs_is_empty(small_dataset) -> None:
    manifest = read_table(storage.join(small_dataset, "manifest.parquet"))
    manifest["status"] = "quarantined"
    write_table(manifest, storage.join(small_dataset, "manifest.parquet"))
    assert features.plan_feature_shards(small_dataset) == []
    with pytest.raises(ValueError):
        features.plan_feature_shards(small_dataset, shard_size=0)
