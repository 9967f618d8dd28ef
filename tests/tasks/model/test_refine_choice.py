"""The edge-refinement choice: measured once per model, saved beside it, followed by ``auto``."""

from __future__ import annotations

import json

import pytest

from tasks.model.refine import RefineConfig
from tasks.model.refine_choice import (
    REFINE_CHOICE_FILE,
    RefineChoice,
    choose_refinement,
    load_refine_choice,
    resolve_refine,
    save_refine_choice,
)

pytestmark = pytest.mark.unit


def test_refinement_is_chosen_only_when_its_mean_iou_is_higher():
    better = choose_refinement([0.90, 0.95], [0.92, 0.95], "val")
    assert better.refine and better.plain_mean_iou == pytest.approx(0.925) and better.refined_mean_iou == pytest.approx(0.935)
    assert (better.n, better.split, better.radius, better.eps) == (2, "val", 2.0, 1e-3)
    assert not choose_refinement([0.99, 0.98], [0.98, 0.98], "val").refine
    assert not choose_refinement([0.9, 0.9], [0.9, 0.9], "val").refine  # a tie keeps the cheaper plain map
    assert choose_refinement([0.5], [0.6], "train", RefineConfig(radius=3, eps=1e-2)).config() == RefineConfig(3, 1e-2)
    with pytest.raises(ValueError, match="same non-zero number"):
        choose_refinement([], [], "val")
    with pytest.raises(ValueError, match="same non-zero number"):
        choose_refinement([0.5, 0.6], [0.5], "val")


def test_the_choice_is_saved_next_to_the_model_and_read_back(tmp_path):
    assert load_refine_choice(str(tmp_path)) is None and load_refine_choice(None) is None
    choice = choose_refinement([0.97, 0.99], [0.96, 0.99], "val")
    url = save_refine_choice(choice, str(tmp_path))
    assert url.endswith(REFINE_CHOICE_FILE) and json.loads((tmp_path / REFINE_CHOICE_FILE).read_text())["refine"] is False
    assert load_refine_choice(str(tmp_path)) == choice


def test_auto_follows_the_measured_choice_and_on_or_off_force_it():
    off = RefineChoice(refine=False, plain_mean_iou=0.9935, refined_mean_iou=0.9931, n=392, split="val",
                       radius=2.0, eps=1e-3)
    on = RefineChoice(refine=True, plain_mean_iou=0.964, refined_mean_iou=0.966, n=392, split="val", radius=3.0,
                      eps=1e-2)
    config, why = resolve_refine("auto", off)
    assert config is None and why.startswith("off (measured for this model on 392 val pairs")
    assert "refined 99.310 % vs plain 99.350 %" in why
    assert resolve_refine("auto", on)[0] == RefineConfig(3.0, 1e-2)  # the refinement that was measured
    assert resolve_refine("auto", None) == (RefineConfig(), "on (the model has no measured choice; refinement pays "
                                                            "on the published weights)")
    for mode in ("on", True, "true"):
        assert resolve_refine(mode, off) == (RefineConfig(), "on (asked for)")
    for mode in ("off", False, "false"):
        assert resolve_refine(mode, on) == (None, "off (asked for)")
    with pytest.raises(ValueError, match="refine must be one of auto, on, off"):
        resolve_refine("sometimes", None)
