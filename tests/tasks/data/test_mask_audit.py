"""Mask audit on constructed pairs: a clean product shot and its typical breakages."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from tasks.data.mask_audit import AuditConfig, MaskAudit, audit_pair, audit_table, summarise

H, W = 256, 192


def _shape() -> np.ndarray:
    """A T-shirt-like mask: a body and sleeves, 0/255."""
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, (96, 150), (52, 80), 0, 0, 360, 255, -1)
    cv2.rectangle(mask, (28, 62), (164, 104), 255, -1)
    return mask


def _photo(mask: np.ndarray, seed: int = 0, colour=(170, 40, 50), background=240, noise=2.0) -> np.ndarray:
    """The product in ``colour`` on a plain background, with mild sensor noise."""
    image = np.full((H, W, 3), background, np.float32)
    image[mask > 0] = colour
    image += np.random.default_rng(seed).normal(0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    mask = _shape()
    return _photo(mask), mask


def test_clean_pair_is_not_flagged(pair):
    image, mask = pair
    audit = audit_pair(image, mask)
    assert audit.reasons == () and not audit.flagged
    assert audit.specks == 0 and audit.components == 1 and audit.holes == 0
    assert audit.edge_agreement > 0.95
    assert audit.roughness < 0.01
    assert audit.foreground_share == pytest.approx(np.mean(mask > 0))
    assert np.isnan(audit.model_iou) and np.isnan(audit.model_confidence)
    assert audit_pair(image, mask > 0).reasons == ()  # a bool mask is the same mask


def test_salt_and_pepper_mask_is_speckle(pair):
    image, mask = pair
    flip = np.random.default_rng(1).random(mask.shape) < 0.01
    noisy = np.where(flip, 255 - mask, mask).astype(np.uint8)
    audit = audit_pair(image, noisy)
    assert "speckle" in audit.reasons
    assert audit.specks > 100
    assert "edges" not in audit.reasons  # specks are judged by speckle only


def test_few_pinholes_on_a_smooth_mask_are_not_speckle(pair):
    image, mask = pair
    dotted = mask.copy()
    for i in range(20):  # pinholes along a stripe, as a threshold leaves them in a striped garment
        dotted[150, 60 + 4 * i] = 0
    audit = audit_pair(image, dotted)
    assert audit.specks == 20 and audit.roughness < 0.01
    assert audit.reasons == ()


def test_large_hole_inside_the_product_is_holes(pair):
    image, mask = pair
    hollow = cv2.circle(mask.copy(), (96, 160), 28, 0, -1)
    audit = audit_pair(image, hollow)
    assert audit.holes == 1
    assert audit.suspect_hole_share == pytest.approx(audit.hole_share) and audit.hole_share > 0.1
    assert "holes" in audit.reasons


def test_real_gap_showing_the_background_is_not_holes():
    mask = _shape()
    cv2.circle(mask, (96, 160), 28, 0, -1)  # a cut-out in the product itself: the photo shows it
    audit = audit_pair(_photo(mask), mask)
    assert audit.holes == 1 and audit.hole_share > 0.1
    assert audit.suspect_hole_share == 0
    assert audit.reasons == ()


def test_misaligned_mask_is_edges(pair):
    image, mask = pair
    shifted = np.zeros_like(mask)
    shifted[20:, 20:] = mask[:-20, :-20]
    audit = audit_pair(image, shifted)
    assert audit.edge_agreement < 0.8
    assert "edges" in audit.reasons


def test_separate_fragment_is_fragments(pair):
    image, mask = pair
    stray = cv2.circle(mask.copy(), (170, 20), 12, 255, -1)
    audit = audit_pair(image, stray)
    assert audit.components == 2
    assert audit.fragment_share > 0.02
    assert "fragments" in audit.reasons


def test_two_main_parts_are_not_fragments():
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, (50, 128), (30, 60), 0, 0, 360, 255, -1)  # a pair of shoes, say
    cv2.ellipse(mask, (142, 128), (28, 55), 0, 0, 360, 255, -1)
    audit = audit_pair(_photo(mask), mask)
    assert audit.components == 2 and audit.fragment_share == 0
    assert audit.reasons == ()


def test_confident_contradicting_model_disagrees_and_hesitant_model_does_not(pair):
    image, mask = pair
    elsewhere = np.zeros((H, W), np.float32)
    elsewhere[10:90, 10:90] = 1
    contradicting = np.where(elsewhere > 0, 0.98, 0.02).astype(np.float32)
    audit = audit_pair(image, mask, probability=contradicting)
    assert audit.model_confidence > 0.8 and audit.model_iou < 0.2
    assert audit.reasons == ("model_disagrees",)

    hesitant = (0.5 + np.random.default_rng(2).uniform(-0.05, 0.05, (H, W))).astype(np.float32)
    audit = audit_pair(image, mask, probability=hesitant)
    assert audit.model_confidence < 0.5
    assert audit.reasons == ()

    agreeing = np.where(mask > 0, 0.97, 0.03).astype(np.float32)
    audit = audit_pair(image, mask, probability=agreeing)
    assert audit.model_iou == 1.0 and audit.reasons == ()


def test_empty_mask_is_empty(pair):
    image, _ = pair
    audit = audit_pair(image, np.zeros((H, W), np.uint8))
    assert audit.reasons == ("empty",)
    assert np.isnan(audit.edge_agreement)


def test_large_photo_is_audited_on_a_downscaled_copy():
    mask = cv2.resize(_shape(), (1000, 1333), interpolation=cv2.INTER_NEAREST)
    image = cv2.resize(_photo(_shape()), (1000, 1333), interpolation=cv2.INTER_NEAREST)
    audit = audit_pair(image, mask)
    assert audit.reasons == ()
    flip = np.random.default_rng(3).random(mask.shape) < 0.002
    blotchy = np.where(cv2.dilate(flip.view(np.uint8), np.ones((5, 5), np.uint8)) > 0, 255 - mask, mask)
    assert "speckle" in audit_pair(image, blotchy.astype(np.uint8)).reasons


def test_shape_mismatch_raises(pair):
    image, mask = pair
    with pytest.raises(ValueError, match="mask shape"):
        audit_pair(image, mask[:-1])
    with pytest.raises(ValueError, match="probability shape"):
        audit_pair(image, mask, probability=np.zeros((H, W + 1), np.float32))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        audit_pair(image[..., 0], mask)
    with pytest.raises(ValueError, match="bool or uint8"):
        audit_pair(image, mask.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit_pair(image, mask, probability=np.full((H, W), 2.0, np.float32))


def test_table_and_summary_count_reasons(pair):
    image, mask = pair
    shifted = np.zeros_like(mask)
    shifted[20:, 20:] = mask[:-20, :-20]
    audits = [("clean", audit_pair(image, mask)), ("shifted", audit_pair(image, shifted)),
              ("empty", audit_pair(image, np.zeros_like(mask)))]
    df = audit_table(audits)
    assert list(df["stem"]) == ["clean", "shifted", "empty"]
    assert list(df["flagged"]) == [False, True, True]
    assert df.loc[0, "reasons"] == "" and "edges" in df.loc[1, "reasons"].split(",")
    assert {"specks", "edge_agreement", "model_iou"} <= set(df.columns)

    summary = summarise(df)
    assert summary["pairs"] == 3 and summary["flagged"] == 2
    assert summary["flagged_share"] == pytest.approx(2 / 3)
    assert summary["reasons"]["empty"] == 1 and summary["reasons"]["edges"] == 1
    assert summary["reasons"]["holes"] == 0
    json.dumps(summary)
    assert summarise(audit_table([]))["pairs"] == 0


def test_to_dict_is_json_ready(pair):
    image, mask = pair
    audit = audit_pair(image, mask)
    record = audit.to_dict()
    assert record["model_iou"] is None and record["reasons"] == [] and record["flagged"] is False
    json.dumps(record)
    assert isinstance(audit, MaskAudit)


def test_config_is_frozen_and_changes_the_verdict(pair):
    image, mask = pair
    with pytest.raises(AttributeError):
        AuditConfig().max_specks = 1  # type: ignore[misc]
    strict = AuditConfig(min_edge_agreement=1.01)
    assert "edges" in audit_pair(image, mask, strict).reasons


def test_a_thin_strap_is_not_a_ragged_outline():
    """Beachwear and accessories have straps a few pixels wide: an opening removes them whole,
    which is one large changed piece, not the many small jags of a broken mask."""
    image = np.full((320, 320, 3), 245, np.uint8)
    mask = np.zeros((320, 320), np.uint8)
    cv2.ellipse(mask, (160, 200), (70, 50), 0, 0, 360, 255, -1)  # the cup
    for x in (120, 200):  # two straps, 3 px wide, from the cup up to the frame's top
        cv2.line(mask, (x, 190), (x + 10, 20), 255, 2)
    image[mask > 0] = (200, 40, 60)
    assert audit_pair(image, mask).reasons == ()
    # counted as jags, the removed straps would have made it "ragged"
    assert "ragged" in audit_pair(image, mask, AuditConfig(max_jag_area=10**9)).reasons


def test_the_gradient_quantiles_are_exactly_what_a_full_partition_gives():
    """The audit's edge threshold takes two quantiles of a gradient map among its positive values
    only; they must equal ``np.partition``'s and ``np.median``'s to the bit (half zeros, as a flat
    background gives; ties; all zeros; a single value; ranks at both ends)."""
    from tasks.data.mask_audit import _kth_smallest, _median

    rng = np.random.default_rng(3)
    maps = [np.sqrt(rng.integers(0, 2, 4000) * rng.integers(1, 2_080_800, 4000)).astype(np.float32),
            np.sqrt(rng.integers(0, 50, 999)).astype(np.float32), np.zeros(17, np.float32),
            np.full(5, 3.0, np.float32), np.float32(rng.random(2048) * 1e3)]
    for values in maps:
        ks = sorted({0, values.size // 3, int(0.9 * (values.size - 1)), values.size - 1})
        expected = np.partition(values, ks)[ks]
        assert [v.tobytes() for v in _kth_smallest(values, ks)] == [v.tobytes() for v in expected]
        assert _median(values) == np.float32(np.median(values))
        for above in (0.5, float(np.median(values)), float(values.max())):  # wanted ranks on either side
            assert [v.tobytes() for v in _kth_smallest(values, ks, above=above)] == [v.tobytes() for v in expected]


def _edge_support_by_the_formula(magnitude, fg, config):
    """The module docstring's edge rule computed the plain way: every quantile selected in full."""
    far = ~cv2.dilate(fg.view(np.uint8), np.ones((9, 9), np.uint8)).view(bool)
    background = magnitude[far] if far.sum() >= 0.01 * far.size else magnitude.ravel()
    flat = magnitude.ravel()
    p90 = np.partition(flat, int(0.9 * (flat.size - 1)))[int(0.9 * (flat.size - 1))]
    threshold = max(config.edge_relative * p90, config.edge_noise_factor * np.float32(np.median(background)),
                    config.edge_min_gradient)
    size = 2 * config.edge_tolerance + 1
    return cv2.dilate(magnitude, np.ones((size, size), np.uint8)) >= threshold


@pytest.mark.parametrize("noise", [0.0, 2.0, 25.0])
def test_the_edge_map_is_the_documented_rule_whichever_term_decides(noise):
    """The edge map skips selecting a quantile when a count shows it cannot decide the threshold; it
    must equal the rule computed in full, on photos where each term decides (a flat background: the
    90th percentile or the floor; a noisy one: the noise term) and under configs that move the terms."""
    from tasks.data.mask_audit import _edge_support, _gradient

    mask = _shape()
    magnitude = _gradient(_photo(mask, seed=5, noise=noise))
    fg = mask >= 128
    configs = [AuditConfig(), AuditConfig(edge_min_gradient=60.0), AuditConfig(edge_noise_factor=40.0),
               AuditConfig(edge_relative=0.9), AuditConfig(edge_min_gradient=0.0, edge_noise_factor=0.0)]
    for config in configs:
        assert np.array_equal(_edge_support(magnitude, fg, config), _edge_support_by_the_formula(magnitude, fg, config))
