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

    Returns ``{"n_new", "until" (the newest pair's time, the cut-off the next stages use),
    "base_version", "origins": {origin: n}, "n_carried"}``.
    """
    state = read_state(bucket_url, storage_options)
    base = base_dataset(requested_base, registered_model, state)
    pairs, carried = _pairs_for(bucket_url, base, state, storage_options)
    newest = max((p["at"] for p in pairs), default=None)
    print(f"{len(pairs)} new pairs in the retraining pool since {state.get('last_pair_at') or 'the beginning'}; "
          f"base dataset: {base or 'none'}"
          + (f"; {len(carried)} pairs of an earlier run that the base lacks come again" if carried else ""))
    return {"n_new": len(pairs), "until": newest, "base_version": base,
            "origins": {o: sum(p.get("origin") == o for p in pairs) for o in POOL_ORIGINS}, "n_carried": len(carried)}


def _pairs_for(bucket_url: str, base: str, state: dict, storage_options: dict | None) -> tuple[list[dict], list[dict]]:
    """The pool, listed once: its new pairs and the used pairs ``base`` lacks."""
    pool = list_pool(bucket_url, storage_options)
    return (new_pool_pairs(bucket_url, state, storage_options, pool=pool),
            pool_pairs_missing_from(bucket_url, base, state, storage_options, pool=pool))


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
    new, carried = _pairs_for(bucket_url, found["base_version"], read_state(bucket_url, storage_options),
                              storage_options)
    pairs = [p for p in new if found["until"] is None or p["at"] <= found["until"]] + carried
    result = build_retraining_dataset(bucket_url, found["base_version"], pairs, config, storage_options)
    print(format_result(result))
    return result


def training_request(base_conf: dict[str, Any], bucket: str, dataset_version: str, epochs: int,
                     registered_model: str, working_size: int) -> dict[str, Any]:
    """The ``training_conf`` stage: the training DAG's conf for a retraining run (the operator's
    ``base_conf`` plus the new dataset version, starting from the champion, fewer epochs)."""
    conf = {**base_conf, "bucket": bucket, "dataset_version": dataset_version, "init_from": "champion",
            "epochs": epochs, "registered_model": registered_model, "working_size": working_size}
    print(f"triggering bgremoval_training with {conf}")
    return conf


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
