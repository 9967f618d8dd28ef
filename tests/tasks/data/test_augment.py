"""Augmentation: image and mask stay aligned through every op, backgrounds change only outside
the product, cluster balancing, determinism, and the stage functions end to end on storage."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.data import augment
from tasks.core import storage
from tasks.data.augment import AugmentConfig, plan_augmentation
from tasks.core.manifest import MANIFEST_COLUMNS, read_table, to_frame, write_table
from tasks.data.splits import SplitConfig, assign_splits
from tasks.dev.synth import SynthConfig, encode_jpeg, encode_png, render_item

PRODUCT = np.array([20, 200, 40], np.float32)  # no studio background is this saturated a green
FIVE = np.ones((5, 5), np.uint8)  # 2 px either way


def _known_pair(height: int = 160, width: int = 120, seed: int = 0, old_bg=(128, 128, 128)):
    """A flat green product (ellipse + rectangle) on a flat background, and its exact mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    cx, cy = int(width * rng.uniform(0.4, 0.6)), int(height * rng.uniform(0.35, 0.5))
    cv2.ellipse(mask, (cx, cy), (width // 4, height // 5), float(rng.uniform(0, 90)), 0, 360, 255, -1)
    cv2.rectangle(mask, (cx - width // 8, cy), (cx + width // 10, int(height * 0.85)), 255, -1)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = old_bg
    image[mask > 0] = PRODUCT.astype(np.uint8)
    return image, mask


def _is_product(image: np.ndarray) -> np.ndarray:
    return np.linalg.norm(image.astype(np.float32) - PRODUCT, axis=2) < 60


def _assert_aligned(image: np.ndarray, mask: np.ndarray) -> None:
    """The mask covers exactly the product-coloured pixels, up to 2 px at the edge."""
    assert image.shape[:2] == mask.shape and image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    product = _is_product(image)
    core = cv2.erode(mask, FIVE) > 0
    outside = cv2.dilate(mask, FIVE) == 0
    assert core.any(), "the product vanished"
    assert product[core].all(), f"{(~product[core]).sum()} mask pixels are not product-coloured"
    assert not product[outside].any(), f"{product[outside].sum()} product-coloured pixels outside the mask"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Ops: alignment and their own invariants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_every_op_keeps_image_and_mask_aligned(seed):
    image, mask = _known_pair(seed=seed)
    other_image, other_mask = _known_pair(140, 180, seed=seed + 10, old_bg=(230, 225, 215))
    rng = _rng(seed)
    outputs = {
        "crop": augment.random_crop_keep_product(image, mask, rng),
        "flip": augment.flip(image, mask, rng),
        "side_by_side": augment.side_by_side(image, mask, rng, other_image, other_mask),
        "place": augment.place_on_background(image, mask, rng, other_image, other_mask),
        "jitter": augment.photometric_jitter(image, mask, rng),
        **{f"background-{k}": augment.replace_background(image, mask, rng, kind=k) for k in augment.BACKGROUND_KINDS},
    }
    for name, (out_image, out_mask) in outputs.items():
        try:
            _assert_aligned(out_image, out_mask)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


@pytest.mark.parametrize("seed", range(12))
def test_whole_recipes_keep_alignment_and_working_size(seed):
    config = AugmentConfig(p_side_by_side=0.3, p_place=0.3)
    rng = _rng(seed)
    ops = augment.draw_recipe(rng, config)
    primary, secondary = _known_pair(seed=seed), _known_pair(100, 150, seed=seed + 50, old_bg=(200, 200, 240))
    image, mask = augment.make_sample(primary, secondary, ops, rng, working_size=128)
    assert max(mask.shape) == 128, ops
    _assert_aligned(image, mask)
    small = tuple(cv2.resize(a, (75, 100), interpolation=cv2.INTER_NEAREST) for a in primary)
    image, mask = augment.make_sample(small, secondary, ops, _rng(seed), working_size=128)
    assert max(mask.shape) == 100, ops  # a pair smaller than the working size is not enlarged
    _assert_aligned(image, mask)


def test_inputs_are_never_modified():
    image, mask = _known_pair()
    other_image, other_mask = _known_pair(seed=3)
    before = [a.copy() for a in (image, mask, other_image, other_mask)]
    rng = _rng()
    augment.make_sample((image, mask), (other_image, other_mask),
                        ["crop", "flip", "place", "background", "jitter"], rng, 96)
    augment.side_by_side(image, mask, rng, other_image, other_mask)
    for a, b in zip((image, mask, other_image, other_mask), before, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", range(25))
def test_crop_keeps_the_whole_product_with_a_margin(seed):
    item = render_item(seed, SynthConfig(n=25, seed=2, max_side=160))
    image, mask = augment.random_crop_keep_product(item.image, item.mask, _rng(seed), margin=0.04)
    assert image.shape[:2] == mask.shape
    assert np.count_nonzero(mask) == np.count_nonzero(item.mask)  # nothing of the product cut off
    height, width = item.mask.shape
    pad = max(2, round(0.04 * max(height, width)))
    x0, y0, x1, y1 = augment.product_box(item.mask)
    cx0, cy0, cx1, cy1 = augment.product_box(mask)
    ch, cw = mask.shape
    assert cx0 >= min(pad, x0) and cy0 >= min(pad, y0)
    assert cw - cx1 >= min(pad, width - x1) and ch - cy1 >= min(pad, height - y1)
    assert abs(cw / ch - width / height) < 0.08  # the window keeps the frame's shape


def test_crop_is_random_but_seeded():
    item = render_item(1, SynthConfig(n=2, seed=0, max_side=200))
    shapes = {augment.random_crop_keep_product(item.image, item.mask, _rng(s))[1].shape for s in range(8)}
    assert len(shapes) > 1
    a = augment.random_crop_keep_product(item.image, item.mask, _rng(5))
    b = augment.random_crop_keep_product(item.image, item.mask, _rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_flip_mirrors_both_and_twice_is_identity():
    image, mask = _known_pair(seed=2)
    flipped = augment.flip(image, mask, _rng())
    assert np.array_equal(flipped[1], mask[:, ::-1]) and np.array_equal(flipped[0], image[:, ::-1])
    again = augment.flip(*flipped, _rng())
    assert np.array_equal(again[0], image) and np.array_equal(again[1], mask)


def _strip(image, mask, margin=0.06):
    x0, _, x1, _ = augment.product_box(mask)
    pad = max(2, round(margin * mask.shape[1]))
    return image[:, max(0, x0 - pad):x1 + pad], mask[:, max(0, x0 - pad):x1 + pad]


def test_side_by_side_mask_is_the_union_of_the_placed_masks():
    a, b = _known_pair(120, 100, seed=1), _known_pair(120, 140, seed=2)
    strips = [_strip(*a), _strip(*b)]
    expected = [np.hstack([strips[0][1], strips[1][1]]), np.hstack([strips[1][1], strips[0][1]])]
    seen = set()
    for seed in range(6):
        image, mask = augment.side_by_side(*a, _rng(seed), *b)
        matches = [np.array_equal(mask, e) for e in expected]
        assert any(matches)
        seen.add(matches.index(True))
        assert np.count_nonzero(mask) == np.count_nonzero(a[1]) + np.count_nonzero(b[1])
        _assert_aligned(image, mask)
    assert seen == {0, 1}  # both orders occur


def test_side_by_side_resizes_to_the_common_height():
    a, b = _known_pair(160, 120, seed=1), _known_pair(80, 60, seed=2)
    image, mask = augment.side_by_side(*a, _rng(), *b)
    assert mask.shape[0] == 80
    n_parts, _ = cv2.connectedComponents(mask)
    assert n_parts - 1 == 2
    expected = np.count_nonzero(a[1]) / 4 + np.count_nonzero(b[1])
    assert abs(np.count_nonzero(mask) - expected) < 0.03 * expected


def test_place_on_background_paints_out_the_other_product_and_keeps_the_placed_mask():
    image, mask = _known_pair(seed=4)
    other_image, other_mask = _known_pair(200, 150, seed=9, old_bg=(236, 232, 226))
    out_image, out_mask = augment.place_on_background(image, mask, _rng(3), other_image, other_mask)
    assert out_mask.shape == other_mask.shape  # the other photo's frame
    _assert_aligned(out_image, out_mask)  # also: no green left where the other product was
    far = cv2.dilate(np.maximum(out_mask, other_mask), np.ones((15, 15), np.uint8)) == 0
    assert np.array_equal(out_image[far], other_image[far])  # the rest of that photo is untouched
    plate = augment.remove_product(other_image, other_mask)
    assert np.abs(plate[other_mask > 0].astype(int) - [236, 232, 226]).max() <= 6  # filled with background


def test_jitter_changes_the_image_a_little_and_never_the_mask():
    item = render_item(2, SynthConfig(n=3, seed=1, max_side=160))
    for seed in range(5):
        image, mask = augment.photometric_jitter(item.image, item.mask, _rng(seed))
        assert np.array_equal(mask, item.mask)
        diff = np.abs(image.astype(int) - item.image.astype(int))
        assert 0 < diff.mean() < 30


# ---------------------------------------------------------------------------------------------
# Background replacement: exact outside, exact inside, soft edge, no halo
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", augment.BACKGROUND_KINDS)
@pytest.mark.parametrize("feather", [1.0, 2.0, None])
def test_background_is_new_outside_and_original_inside(kind, feather):
    item = render_item(5, SynthConfig(n=6, seed=3, max_side=200))
    image, mask = augment.replace_background(item.image, item.mask, _rng(11), kind=kind, feather=feather)
    background = augment.studio_background(kind, *item.mask.shape, _rng(11), item.mask)  # same draws
    assert np.array_equal(mask, item.mask)
    outside = cv2.dilate(item.mask, FIVE) == 0
    inside = cv2.erode(item.mask, FIVE) > 0
    assert np.array_equal(image[outside], background[outside])
    assert np.array_equal(image[inside], item.image[inside])
    assert not np.array_equal(background[outside], item.image[outside])


def test_background_edge_is_soft_and_has_no_halo_of_the_old_background():
    height, width = 120, 120
    coverage = np.zeros((height * 4, width * 4), np.uint8)
    cv2.circle(coverage, (240, 240), 150, 255, -1)
    cover = cv2.resize(coverage, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255
    red, old_green, new_blue = np.array([210, 30, 30]), np.array([30, 190, 40]), np.array([40, 60, 200])
    image = (cover * red + (1 - cover) * old_green + 0.5).astype(np.uint8)  # anti-aliased like a photo
    mask = np.where(cover[..., 0] >= 0.5, 255, 0).astype(np.uint8)
    background = np.empty_like(image)
    background[:] = new_blue
    out = augment.composite(image, mask, background, feather=2.0)
    band = (cv2.dilate(mask, FIVE) > 0) & (cv2.erode(mask, FIVE) == 0)
    pixels = out[band].astype(np.float32)
    # every band pixel lies on the segment product colour -> new background: no green from the old one
    direction = (new_blue - red).astype(np.float32)
    t = np.clip((pixels - red) @ direction / (direction @ direction), 0, 1)
    off_segment = np.linalg.norm(pixels - (red + t[:, None] * direction), axis=1)
    assert off_segment.max() < 4, off_segment.max()
    assert ((t > 0.1) & (t < 0.9)).sum() > 50  # and the edge is blended, not cut


def test_feather_alpha_limits():
    _, mask = _known_pair()
    for feather in (1.0, 1.5, 2.0):
        alpha = augment.feather_alpha(mask, feather)
        assert (alpha[cv2.erode(mask, FIVE) > 0] == 1).all()
        assert (alpha[cv2.dilate(mask, FIVE) == 0] == 0).all()
        assert ((alpha > 0) & (alpha < 1)).any()
    with pytest.raises(ValueError):
        augment.feather_alpha(mask, 3.0)
    with pytest.raises(ValueError, match="unknown background"):
        augment.studio_background("sky", 10, 10, _rng())


def test_background_kinds_differ_and_follow_the_seed():
    _, mask = _known_pair()
    made = {k: augment.studio_background(k, *mask.shape, _rng(1), mask) for k in augment.BACKGROUND_KINDS}
    assert all(b.shape == (*mask.shape, 3) and b.dtype == np.uint8 for b in made.values())
    assert made["plain"].reshape(-1, 3).std(axis=0).max() == 0
    for kind in ("linear", "radial", "paper", "vignette", "floor"):
        assert made[kind].reshape(-1, 3).std(axis=0).max() > 0.5, kind
    again = augment.studio_background("paper", *mask.shape, _rng(1), mask)
    assert np.array_equal(again, made["paper"])
    assert not np.array_equal(augment.studio_background("paper", *mask.shape, _rng(2), mask), made["paper"])


# ---------------------------------------------------------------------------------------------
# Config, recipes, plan
# ---------------------------------------------------------------------------------------------

def test_config_is_validated():
    with pytest.raises(ValueError, match="at most 1"):
        AugmentConfig(p_side_by_side=0.6, p_place=0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AugmentConfig(p_crop=1.5)
    with pytest.raises(ValueError, match="target_per_cluster"):
        AugmentConfig(target_per_cluster=-1)


def test_recipes_follow_the_rules():
    config = AugmentConfig(p_side_by_side=0.3, p_place=0.3)
    recipes = [augment.draw_recipe(_rng(s), config) for s in range(300)]
    assert all(r for r in recipes)
    assert all("background" in r for r in recipes if "side_by_side" in r)
    assert not any("background" in r for r in recipes if "place" in r)
    assert not any("side_by_side" in r and "place" in r for r in recipes)
    counts = pd.Series([op for r in recipes for op in r]).value_counts()
    assert 60 < counts["side_by_side"] < 120 and 60 < counts["place"] < 120
    none = AugmentConfig(p_crop=0, p_flip=0, p_side_by_side=0, p_place=0, p_background=0, p_jitter=0)
    assert augment.draw_recipe(_rng(), none) == ["background"]
    with pytest.raises(ValueError, match="second pair"):
        augment.make_sample(_known_pair(), None, ["place"], _rng(), 64)


def _plan_manifest(sizes: dict[str, int]) -> pd.DataFrame:
    rows = [{"stem": f"{c}-{i}", "status": "ok", "cluster": c, "split": "train"}
            for c, n in sizes.items() for i in range(n)]
    rows += [{"stem": f"{c}-v{i}", "status": "ok", "cluster": c, "split": s}
             for c in sizes for i, s in enumerate(["val", "test"] * 5)]
    rows += [{"stem": f"bad-{i}", "status": "quarantined", "cluster": "b", "split": None} for i in range(30)]
    return to_frame(rows, MANIFEST_COLUMNS)


def test_plan_brings_every_cluster_to_the_target_from_train_only():
    plan = plan_augmentation(_plan_manifest({"a": 50, "b": 10, "c": 250}), AugmentConfig(target_per_cluster=100))
    assert plan == {"a": 50, "b": 90, "c": 0}
    assert list(plan) == sorted(plan)
    assert plan_augmentation(_plan_manifest({"a": 5}), AugmentConfig(target_per_cluster=0)) == {"a": 0}
    with pytest.raises(ValueError, match="review and split"):
        plan_augmentation(pd.DataFrame({"stem": ["x"], "status": ["ok"]}), AugmentConfig())


# ---------------------------------------------------------------------------------------------
# Stage functions on a tiny dataset
# ---------------------------------------------------------------------------------------------

def _tiny_dataset(dataset_url: str, n: int = 24, size: int = 96, options=None) -> pd.DataFrame:
    """A dataset version of ``n`` rendered products (cluster = product type, splits assigned)."""
    config = SynthConfig(n=n, seed=4, max_side=size)
    rows = []
    for index in range(n):
        item = render_item(index, config)
        image_url = storage.join(dataset_url, "clean", "images", f"{item.stem}.jpg")
        mask_url = storage.join(dataset_url, "clean", "masks", f"{item.stem}.png")
        storage.write_bytes(image_url, encode_jpeg(item.image), options)
        storage.write_bytes(mask_url, encode_png(item.mask), options)
        height, width = item.mask.shape
        rows.append({"stem": item.stem, "key": item.stem, "status": "ok", "cluster": item.product_type,
                     "image_url": image_url, "mask_url": mask_url, "width": width, "height": height})
    rows.append({"stem": "broken", "key": "broken", "status": "quarantined", "reason": "undecodable"})
    manifest = to_frame(rows, MANIFEST_COLUMNS)
    manifest["split"] = assign_splits(manifest, SplitConfig(train=0.6, val=0.2, test=0.2, seed=1))
    write_table(manifest, storage.join(dataset_url, "manifest.parquet"), options)
    return manifest


def _run_stage(dataset_url: str, config: AugmentConfig, options=None) -> tuple[dict, list[dict]]:
    manifest = read_table(storage.join(dataset_url, "manifest.parquet"), options)
    plan = plan_augmentation(manifest, config)
    results = [augment.augment_cluster(dataset_url, c, n, config, options, io_threads=2) for c, n in plan.items()]
    return augment.finalize_augmentation(dataset_url, [r["part_url"] for r in results], options), results


def _files(url: str, options=None) -> dict[str, bytes]:
    return {o.relpath: storage.read_bytes(o.url, options) for o in storage.list_objects(url, options)}


def test_augment_and_finalize_end_to_end(tmp_path):
    dataset_url = str(tmp_path / "datasets" / "v1")
    manifest = _tiny_dataset(dataset_url)
    clean_before = _files(storage.join(dataset_url, "clean"))
    config = AugmentConfig(target_per_cluster=5, seed=7, p_side_by_side=0.3, p_place=0.3)
    summary, results = _run_stage(dataset_url, config)

    train = manifest[manifest["split"] == "train"]
    train_sizes = train["cluster"].value_counts().to_dict()
    expected = {c: max(0, 5 - n) for c, n in train_sizes.items()}
    assert summary["per_cluster"] == {c: n for c, n in sorted(expected.items()) if n}
    assert summary["n"] == sum(expected.values()) == sum(r["n"] for r in results) > 0
    assert all(r["part_url"].endswith(f"augmented/parts/{r['cluster']}.parquet") for r in results)

    augmented = read_table(summary["manifest_url"])
    assert list(augmented.columns) == list(augment.AUGMENTED_COLUMNS)
    assert (augmented["split"] == "train").all() and augmented["stem"].is_unique
    train_keys = dict(zip(train["key"], train["cluster"], strict=True))
    for row in augmented.itertuples():
        sources = row.source_keys.split(",")
        assert all(train_keys.get(k) == row.cluster for k in sources), "only the cluster's train pairs are used"
        assert len(sources) == (2 if ("side_by_side" in row.ops or "place" in row.ops) else 1)
        assert row.ops and set(row.ops.split(",")) <= {"crop", "flip", "side_by_side", "place", "background", "jitter"}
        image = Image.open(io.BytesIO(storage.read_bytes(row.image_url)))
        mask = Image.open(io.BytesIO(storage.read_bytes(row.mask_url)))
        assert image.format == "JPEG" and image.mode == "RGB" and mask.mode == "L"
        assert image.size == mask.size == (row.width, row.height) and max(image.size) == 96
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert "/augmented/images/" in row.image_url and row.key in row.mask_url

    gallery = Image.open(io.BytesIO(storage.read_bytes(summary["gallery_url"])))
    assert gallery.format == "JPEG" and gallery.width == 6 * 160
    assert _files(storage.join(dataset_url, "clean")) == clean_before  # inputs untouched
    assert not [o for o in storage.list_objects(dataset_url) if ".tmp-" in o.relpath]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    dataset_url = str(tmp_path / "v")
    _tiny_dataset(dataset_url, n=12)
    config = AugmentConfig(target_per_cluster=4, seed=3)
    first, _ = _run_stage(dataset_url, config)
    images_before = _files(storage.join(dataset_url, "augmented", "images"))
    masks_before = _files(storage.join(dataset_url, "augmented", "masks"))
    second, _ = _run_stage(dataset_url, config)
    assert second == first
    assert _files(storage.join(dataset_url, "augmented", "images")) == images_before
    assert _files(storage.join(dataset_url, "augmented", "masks")) == masks_before

    other_url = str(tmp_path / "w")
    _tiny_dataset(other_url, n=12)
    other, _ = _run_stage(other_url, AugmentConfig(target_per_cluster=4, seed=4))
    theirs = read_table(other["manifest_url"])
    ours = read_table(first["manifest_url"])
    assert len(theirs) == len(ours)
    pairs = zip(ours["image_url"], theirs["image_url"], strict=True)
    assert all(storage.read_bytes(a) != storage.read_bytes(b) for a, b in pairs)


def test_cluster_without_train_pairs_and_empty_runs(tmp_path):
    dataset_url = str(tmp_path / "v")
    _tiny_dataset(dataset_url, n=8)
    config = AugmentConfig(target_per_cluster=0)
    with pytest.raises(ValueError, match="no clean train pairs"):
        augment.augment_cluster(dataset_url, "no_such_cluster", 2, config)
    empty = augment.augment_cluster(dataset_url, "no_such_cluster", 0, config)
    assert empty["n"] == 0 and len(read_table(empty["part_url"])) == 0
    summary = augment.finalize_augmentation(dataset_url, [empty["part_url"]])
    assert summary["n"] == 0 and summary["gallery_url"] is None and summary["per_cluster"] == {}


def test_augment_cluster_on_s3(s3_bucket):
    bucket_url, options = s3_bucket
    dataset_url = storage.join(bucket_url, "datasets", "v1")
    manifest = _tiny_dataset(dataset_url, n=8, options=options)
    cluster = manifest.loc[manifest["split"] == "train", "cluster"].iloc[0]
    result = augment.augment_cluster(dataset_url, cluster, 3, AugmentConfig(), options)
    summary = augment.finalize_augmentation(dataset_url, [result["part_url"]], options)
    augmented = read_table(summary["manifest_url"], options)
    assert summary["n"] == 3 and all(u.startswith("s3://") for u in augmented["image_url"])
    assert storage.exists(summary["gallery_url"], options)


def test_outputs_take_the_datasets_working_size_not_its_most_common_size():
    """Cleaning no longer enlarges small photos, so a dataset mixes sizes: samples are made at the
    longest clean side (the cleaning's working size) unless the config names one."""
    manifest = pd.DataFrame({"status": ["ok", "ok", "ok", "quarantined"], "width": [192, 192, 346, 2000],
                             "height": [256, 256, 512, 3000]})
    assert augment._working_size(manifest, AugmentConfig()) == 512
    assert augment._working_size(manifest, AugmentConfig(working_size=320)) == 320
