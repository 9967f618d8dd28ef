"""The three trigger forms: every field explained and in a section, defaults read from the configs,
one meaning per name, and the converters give back the configs' own defaults."""

from __future__ import annotations

import pytest
from bgremoval_airflow.databricks import databricks_params
from bgremoval_airflow.params import inference, retraining, training

from tasks import registry
from tasks.feedback import retraining_stages as stages
from tasks.data.config import CleaningConfig, SplitConfig
from tasks.evaluation.gate import GateConfig
from tasks.feedback.production import ProductionConfig
from tasks.feedback.config import RetrainingConfig
from tasks.serving.quality import TARGET_IOU
from tasks.train.config import FINE_TUNE_LR, TrainConfig

FORMS = {
    "bgremoval_training": {**training.dag_params(), **databricks_params()},
    "bgremoval_inference": inference.dag_params(),
    "bgremoval_retraining": retraining.dag_params(),
}


def _defaults(form: dict) -> dict:
    return {name: param.value for name, param in form.items()}


@pytest.mark.parametrize("dag_id", sorted(FORMS))
def test_every_field_has_a_title_a_description_and_a_section(dag_id):
    for name, param in FORMS[dag_id].items():
        assert param.schema.get("title"), f"{dag_id}.{name} has no title"
        assert param.description, f"{dag_id}.{name} has no description"
        assert param.schema.get("section"), f"{dag_id}.{name} is in no section"


def test_a_name_means_the_same_in_every_form():
    seen: dict[str, tuple] = {}
    for dag_id, form in FORMS.items():
        for name, param in form.items():
            meaning = (param.value, param.schema.get("title"))
            if name in seen:
                assert seen[name][1] == meaning, f"{name!r} means one thing in {seen[name][0]} and another in {dag_id}"
            seen[name] = (dag_id, meaning)


def test_the_defaults_are_the_configs_defaults():
    form = _defaults(FORMS["bgremoval_training"])
    assert training.cleaning_config(form) == CleaningConfig()
    split = training.split_config(form)
    assert (split.val, split.test, split.seed) == (SplitConfig().val, SplitConfig().test, SplitConfig().seed)
    with pytest.raises(ValueError, match="leave no training pairs"):  # each field is valid, together they are not
        training.split_config({**form, "val_fraction": 0.5, "test_fraction": 0.5})
    assert training.assessment_config(form).gate == GateConfig()
    assert form["registered_model"] == registry.DEFAULT_MODEL_NAME
    assert form["routing_target_iou"] == TARGET_IOU
    config = training.train_config({**form, "batch": "b"}, "file:///d", "file:///o", {})
    defaults = TrainConfig(dataset_url="file:///d", output_url="file:///o")
    for field in ("model", "epochs", "batch_size", "lr", "input_size", "loss", "seed"):
        assert getattr(config, field) == getattr(defaults, field), field
    # an empty learning rate is the fine-tuning one when the run starts from trained weights
    tuned = training.train_config({**form, "batch": "b"}, "file:///d", "file:///o", {}, init_from="file:///w.pt")
    assert tuned.lr == FINE_TUNE_LR and tuned.init_from == "file:///w.pt"
    given = training.train_config({**form, "batch": "b", "learning_rate": 2e-3}, "file:///d", "file:///o", {},
                                  init_from="file:///w.pt")
    assert given.lr == 2e-3
    assert training.train_config({**form, "batch": "b", "loss": "wbce+wiou"}, "file:///d", "file:///o", {}).loss == "wbce+wiou"
    assert inference.production_config(_defaults(FORMS["bgremoval_inference"])) == ProductionConfig()
    retrain = _defaults(FORMS["bgremoval_retraining"])
    assert retraining.retraining_config(retrain) == RetrainingConfig()


def test_the_forms_read_the_deployments_bucket(monkeypatch):
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__BUCKET", "shop-images")
    assert training.dag_params()["bucket"].value == "shop-images"
    assert retraining.dag_params()["bucket"].value == "shop-images"


def test_the_retraining_passes_on_only_keys_the_training_form_has():
    """A typo in ``training_conf`` is refused when the retraining run is triggered, not found when the
    training run it starts fails (after the pool cursor moved on)."""
    from airflow.sdk.exceptions import ParamValidationError

    form = retraining.dag_params()["training_conf"]
    names = set(training.dag_params()) | set(databricks_params())
    assert set(retraining.training_param_names()) == names - set(retraining.SET_BY_RETRAINING)
    # what the retraining sets itself would be replaced: refused rather than dropped without a word
    request = stages.training_request({}, "b", "v", 3, "m", 320, "r")["conf"]
    assert set(request) == set(retraining.SET_BY_RETRAINING)
    with pytest.raises(ParamValidationError, match="'epochs' is not one of"):
        form.resolve({"epochs": 10})
    assert form.resolve({"workers": 4, "iou_gate": 0.98}) == {"workers": 4, "iou_gate": 0.98}
    with pytest.raises(ParamValidationError, match="'epoch' is not one of"):
        form.resolve({"epoch": 3})
