"""The retraining DAG's stages, one function per task (``dags/bgremoval_retraining.py``).

The library they call is :mod:`tasks.feedback.retraining` (the pool, the state, building the new
dataset version); what lives here are the rules the DAG used to hold: which dataset the new
pairs extend, when a run is worth it, what the triggered training run is asked to do, and what
is recorded afterwards.
"""

from __future__ import annotations

from typing import Any

from tasks import registry
from tasks.feedback.queue import POOL_ORIGINS, list_pool
from tasks.feedback.retraining import (
    RetrainingConfig,
    advance_state,
    build_retraining_dataset,
    format_result,
    new_pool_pairs,
    pool_pairs_missing_from,
    read_state,
    write_state,
)


def base_dataset(requested: str, registered_model: str, state: dict) -> str:
    """The dataset version the new pairs extend: ``requested`` when given, else the champion's
    ``dataset_version`` tag, else the last version this loop built ("" when there is none)."""
    base = requested.strip()
    if not base:
        version = registry.alias_version(registered_model, registry.CHAMPION)
        if version is not None:
            base = registry.version_tags(registered_model, version).get("dataset_version", "")
    return base or state.get("last_dataset_version") or ""


def find_new_pairs(bucket_url: str, requested_base: str, registered_model: str,
                   storage_options: dict | None = None) -> dict[str, Any]:
    """The ``find_new_pairs`` stage: the pool pairs added since the last run, the base dataset, and
    the pairs an earlier run used that the base lacks (:func:`pool_pairs_missing_from`: they go into
    the new version again, but only new pairs count towards ``min_new_pairs``).

    Pairs that a rolled-back version published without a person's look are left out (``n_left_out``):
    their masks are that version's, which was rolled back. The pairs of its doubtful photos, which a
    person decided on, are a person's and stay.

    Returns ``{"n_new", "until" (the newest pair's time, the cut-off the next stages use),
    "base_version", "rolled_back" (versions), "origins": {origin: n}, "n_carried", "n_left_out"}``.
    """
    state = read_state(bucket_url, storage_options)
    base = base_dataset(requested_base, registered_model, state)
    rolled_back = registry.rolled_back_versions(registered_model)
    pairs, carried, left_out = _pairs_for(bucket_url, base, state, rolled_back, storage_options)
    newest = max((p["at"] for p in pairs), default=None)
    print(f"{len(pairs)} new pairs in the retraining pool since {state.get('last_pair_at') or 'the beginning'}; "
          f"base dataset: {base or 'none'}"
          + (f"; {len(carried)} pairs of an earlier run that the base lacks come again" if carried else ""))
    if left_out:
        print(f"{len(left_out)} pairs left out: published unreviewed by a version that was rolled back "
              f"({', '.join(rolled_back)}); their cut-outs stay published (drop those photos under a new batch "
              "name to cut them out again with the champion)")
    return {"n_new": len(pairs), "until": newest, "base_version": base, "rolled_back": rolled_back,
            "origins": {o: sum(p.get("origin") == o for p in pairs) for o in POOL_ORIGINS}, "n_carried": len(carried),
            "n_left_out": len(left_out)}


def _pairs_for(bucket_url: str, base: str, state: dict, rolled_back: list[str],
               storage_options: dict | None) -> tuple[list[dict], list[dict], list[dict]]:
    """The pool, listed once: its new pairs and the used pairs ``base`` lacks, less the pairs a
    rolled-back version published without a person's look (its masks are what was rolled back), and
    those pairs."""
    pool = list_pool(bucket_url, storage_options)
    distrusted = {p["pair_id"] for p in pool if p.get("origin") == "published" and str(p.get("model_version")) in rolled_back}
    new = new_pool_pairs(bucket_url, state, storage_options, pool=pool)
    carried = pool_pairs_missing_from(bucket_url, base, state, storage_options, pool=pool)
    return ([p for p in new if p["pair_id"] not in distrusted], [p for p in carried if p["pair_id"] not in distrusted],
            [p for p in pool if p["pair_id"] in distrusted])


def worth_retraining(found: dict[str, Any], min_new_pairs: int) -> bool:
    """The ``enough_new_pairs`` stage: a base dataset exists and at least ``min_new_pairs`` came in."""
    if not found["base_version"]:
        print("no base dataset: the registered model has no champion with a dataset_version tag yet")
        return False
    if found["n_new"] < min_new_pairs:
        print(f"only {found['n_new']} new pairs (< {min_new_pairs}): no retraining this time")
        return False
    return True


def build_dataset(bucket_url: str, found: dict[str, Any], config: RetrainingConfig,
                  storage_options: dict | None = None) -> dict[str, Any]:
    """The ``build_dataset`` stage: the base version plus the pool pairs up to ``found["until"]``
    (pairs that arrived while the run was going wait for the next one) and the earlier runs' pairs
    the base lacks."""
    new, carried, _ = _pairs_for(bucket_url, found["base_version"], read_state(bucket_url, storage_options),
                                 found.get("rolled_back", []), storage_options)
    pairs = [p for p in new if found["until"] is None or p["at"] <= found["until"]] + carried
    result = build_retraining_dataset(bucket_url, found["base_version"], pairs, config, storage_options)
    print(format_result(result))
    return result


def training_run_id(retraining_run_id: str, dataset_version: str) -> str:
    """The run id of the training run a retraining run starts on ``dataset_version``: one per
    retraining run and dataset version, so a retried or cleared ``trigger_training`` finds that run
    instead of starting a second training, while a run cleared from ``find_new_pairs`` after more
    pairs came in (another version) trains that version."""
    return f"retrain__{dataset_version}__{retraining_run_id}"


#: The training Params a retraining run takes from the champion's recipe (:func:`tasks.registry.training_recipe`)
#: unless ``training_conf`` sets them: Param name → recipe key.
INHERITED_FROM_CHAMPION = {"model": "model", "train_input_size": "input_size", "loss": "loss"}


def training_request(base_conf: dict[str, Any], bucket: str, dataset_version: str, epochs: int,
                     registered_model: str, working_size: int, retraining_run_id: str,
                     champion: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``training_conf`` stage: ``{"conf", "run_id"}`` of the training run to start: the operator's
    ``base_conf`` plus the new dataset version, starting from the champion, fewer epochs; its run id
    from :func:`training_run_id`. The run trains the champion's architecture, input size and loss
    (``champion``: its :func:`tasks.registry.training_recipe`) unless ``base_conf`` sets them. Raises
    ``ValueError`` when the champion has custom channel widths, which ``bgremoval_training`` cannot set,
    or when ``base_conf`` asks for another architecture than the champion's, whose weights it starts from."""
    champion = champion or {}
    if base_conf.get("model") and champion.get("model") and base_conf["model"] != champion["model"]:
        raise ValueError(f"training_conf asks for a {base_conf['model']}, but retraining starts from the champion of "
                         f"{registered_model!r}, a {champion['model']} (version {champion.get('version')}): "
                         "leave model out of training_conf, or train the other architecture with bgremoval_training")
    if champion.get("model_widths"):
        raise ValueError(f"the champion of {registered_model!r} (version {champion.get('version')}) has custom channel "
                         f"widths {champion['model_widths']}; bgremoval_training trains the standard widths only: promote a "
                         "standard-width model, or retrain this one where its widths are set (TrainConfig.model_widths)")
    inherited = {param: champion[key] for param, key in INHERITED_FROM_CHAMPION.items()
                 if key in champion and param not in base_conf}
    conf = {**inherited, **base_conf, "bucket": bucket, "dataset_version": dataset_version, "init_from": "champion",
            "epochs": epochs, "registered_model": registered_model, "working_size": working_size}
    run_id = training_run_id(retraining_run_id, dataset_version)
    if inherited:
        print(f"as the champion (version {champion.get('version')}) was trained: "
              + ", ".join(f"{param}={value}" for param, value in inherited.items()))
    print(f"triggering bgremoval_training run {run_id} with {conf}")
    return {"conf": conf, "run_id": run_id}


def record_state(bucket_url: str, dataset: dict[str, Any], retraining_run: str, training_run: str | None,
                 storage_options: dict | None = None) -> dict[str, Any]:
    """The ``record_state`` stage: mark the pairs used and the version built in the loop's state."""
    state = advance_state(read_state(bucket_url, storage_options), dataset,
                          retraining_run=retraining_run, training_run=training_run)
    write_state(bucket_url, state, storage_options)
    print(f"state: pairs up to {state['last_pair_at']} used; dataset {state['last_dataset_version']}; "
          f"training run {training_run}")
    return {"last_pair_at": state["last_pair_at"], "last_dataset_version": state["last_dataset_version"],
            "training_run": training_run}
