"""The edge-refinement choice: measured once per model, saved beside it, followed by ``auto``."""

from __future__ import annotations

import json
import statistics

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


def test_refinement_is_chosen_only_when_its_gain_is_larger_than_the_noise():
    plain = [0.90 + 0.002 * (i % 7) for i in range(40)]
    clear = choose_refinement(plain, [p + 0.003 + 0.002 * (i % 3) for i, p in enumerate(plain)], "val")
    assert clear.refine and clear.n == 40 and (clear.split, clear.radius, clear.eps) == ("val", 2.0, 1e-3)
    assert clear.refined_mean_iou - clear.plain_mean_iou == pytest.approx(0.003 + 0.002 * 39 / 40)
    assert clear.gain_se == pytest.approx(statistics.stdev([0.002 * (i % 3) for i in range(40)]) / 40 ** 0.5)
    assert "gain +0.495 ± 0.026 point" in clear.describe() and clear.describe().startswith("on (")

    # refined higher on average, but by less than its spread over the pairs shows
    noisy = choose_refinement(plain, [p + (0.021 if i % 2 else -0.02) for i, p in enumerate(plain)], "val")
    assert noisy.refined_mean_iou > noisy.plain_mean_iou and not noisy.refine
    assert noisy.describe().endswith("within the noise, so the plain maps, which cost less, are kept)")

    few = choose_refinement([0.90] * 5, [0.95, 0.96, 0.95, 0.96, 0.95], "val")
    assert not few.refine and "fewer than 30 pairs cannot show a gain" in few.describe()
    assert not choose_refinement(plain, [p - 0.01 for p in plain], "val").refine
    assert not choose_refinement(plain, plain, "val").refine  # a tie keeps the cheaper plain map
    one = choose_refinement([0.5], [0.6], "train", RefineConfig(radius=3, eps=1e-2))
    assert not one.refine and one.gain_se is None and (one.radius, one.eps) == (3.0, 1e-2)
    assert choose_refinement(plain, [p + 0.01 for p in plain], "val", RefineConfig(3, 1e-2)).config() == RefineConfig(3, 1e-2)
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


def test_a_choice_saved_before_the_gain_s_spread_was_recorded_still_loads(tmp_path):
    saved = {"refine": True, "plain_mean_iou": 0.96, "refined_mean_iou": 0.9613, "n": 370, "split": "val",
             "radius": 2.0, "eps": 1e-3, "a_later_field": 1}
    (tmp_path / REFINE_CHOICE_FILE).write_text(json.dumps(saved))
    choice = load_refine_choice(str(tmp_path))
    assert choice.refine and choice.gain_se is None and choice.config() == RefineConfig()
    assert choice.describe() == "on (measured for this model on 370 val pairs: mean IoU refined 96.130 % vs plain 96.000 %)"
    for broken in ({"refine": True}, ["not", "a", "choice"]):
        (tmp_path / REFINE_CHOICE_FILE).write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"{REFINE_CHOICE_FILE} is not a refinement choice: it lacks "):
            load_refine_choice(str(tmp_path))


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
