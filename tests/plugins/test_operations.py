"""``bgremoval_airflow.operations``: the failure line, and a mail when addresses are configured."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from bgremoval_airflow.operations import TASK_TIMEOUT, FailureLog, failure_notifiers, task_defaults


def test_a_failure_is_logged_with_where_and_why(caplog):
    ti = SimpleNamespace(dag_id="bgremoval_inference", task_id="cut_out_shard", map_index=3, run_id="drop__a",
                         try_number=2)
    with caplog.at_level(logging.ERROR, logger="bgremoval.operations"):
        FailureLog().notify({"ti": ti, "exception": RuntimeError("S3 said 503")})
    line = caplog.records[-1].getMessage()
    for part in ("dag=bgremoval_inference", "task=cut_out_shard", "map_index=3", "run=drop__a", "try=2",
                 "reason=S3 said 503"):
        assert part in line
    # an execution API error says "Server returned error" and keeps the reason in its detail
    from airflow.sdk.api.client import ServerResponseError

    refused = ServerResponseError.__new__(ServerResponseError)
    Exception.__init__(refused, "Server returned error")
    refused.detail = {"reason": "Invalid input for param workers: 999 is greater than the maximum of 64"}
    with caplog.at_level(logging.ERROR, logger="bgremoval.operations"):
        FailureLog().notify({"ti": ti, "exception": refused})
    assert "reason=Server returned error: {'reason': 'Invalid input for param workers" in caplog.records[-1].getMessage()


def test_failures_are_mailed_only_when_addresses_are_configured(monkeypatch):
    monkeypatch.delenv("AIRFLOW__BGREMOVAL__FAILURE_EMAIL", raising=False)
    assert [type(n).__name__ for n in failure_notifiers()] == ["FailureLog"]
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__FAILURE_EMAIL", "ml-team@example.com, ops@example.com")
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__SMTP_CONN_ID", "studio_smtp")
    log, mail = failure_notifiers()
    assert isinstance(log, FailureLog) and type(mail).__name__ == "SmtpNotifier"
    assert list(mail.to) == ["ml-team@example.com", "ops@example.com"] and mail.smtp_conn_id == "studio_smtp"
    defaults = task_defaults()
    assert defaults["execution_timeout"] == TASK_TIMEOUT and defaults["retry_exponential_backoff"]


def test_the_review_gate_is_assigned_has_a_deadline_and_announces_itself(monkeypatch, caplog):
    from datetime import timedelta

    from bgremoval_airflow.operations import ReviewRequested, review_gate

    monkeypatch.setenv("AIRFLOW__BGREMOVAL__REVIEWERS", "ana, ben")
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__REVIEW_TIMEOUT_HOURS", "24")
    gate = review_gate()
    assert [u["id"] for u in gate["assigned_users"]] == ["ana", "ben"]
    assert gate["response_timeout"] == timedelta(hours=24) and gate["defaults"] == "Reject"
    assert gate["retries"] == 0 and gate["execution_timeout"] is None
    ti = SimpleNamespace(dag_id="bgremoval_training", task_id="review_clusters", run_id="manual__1")
    with caplog.at_level(logging.WARNING, logger="bgremoval.operations"):
        ReviewRequested().notify({"ti": ti})
    assert "assigned=ana, ben" in caplog.records[-1].getMessage() and "24 h" in caplog.records[-1].getMessage()


def test_an_overdue_training_run_is_logged_by_the_deadline_callback(monkeypatch, caplog):
    import asyncio
    from datetime import timedelta

    from bgremoval_airflow.operations import run_overdue, training_deadline

    monkeypatch.delenv("AIRFLOW__BGREMOVAL__FAILURE_EMAIL", raising=False)
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__TRAINING_DEADLINE_HOURS", "0")
    assert training_deadline("bgremoval_training") is None
    monkeypatch.setenv("AIRFLOW__BGREMOVAL__TRAINING_DEADLINE_HOURS", "30")
    alert = training_deadline("bgremoval_training")
    assert alert.interval == timedelta(hours=30) and alert.callback.kwargs == {"dag_id": "bgremoval_training",
                                                                               "hours": 30.0}
    with caplog.at_level(logging.ERROR, logger="bgremoval.operations"):
        line = asyncio.run(run_overdue(**alert.callback.kwargs, context={"dag_run": {"run_id": "manual__7"}}))
    assert line == "run overdue: dag=bgremoval_training run=manual__7 not finished 30 h after it was queued"
    assert caplog.records[-1].getMessage() == line


def test_a_failed_gate_fails_the_task_unless_told_to_skip(capsys):
    from airflow.sdk.exceptions import AirflowFailException
    from bgremoval_airflow.operations import gate_passed

    failed = {"passed": False, "reasons": ["mean IoU 96.000 % vs gate 97.000 %"]}
    assert gate_passed({"passed": True, "reasons": []}, "fail")
    with pytest.raises(AirflowFailException, match="mean IoU 96.000 % vs gate 97.000 %"):
        gate_passed(failed, "fail")
    assert not gate_passed(failed, "skip") and "gate FAILED" in capsys.readouterr().out


def test_errors_that_waiting_cannot_mend_fail_without_retries():
    from airflow.sdk.exceptions import AirflowFailException
    from bgremoval_airflow.operations import fail_at_once

    with pytest.raises(AirflowFailException, match="no training pairs"):
        with fail_at_once(ValueError):
            raise ValueError("val_fraction 0.5 + test_fraction 0.5 leave no training pairs")
    with pytest.raises(KeyError):  # others go on to Airflow's retries
        with fail_at_once(ValueError):
            raise KeyError("bucket")


def test_a_conf_key_without_a_param_fails_the_task_at_once_with_the_closest_name():
    from airflow.sdk.exceptions import AirflowFailException
    from bgremoval_airflow.operations import refuse_unknown_conf, unknown_conf_keys

    params = {"epochs": 1, "batch": "a", "bucket": "b"}
    assert unknown_conf_keys({"epochs": 3, "batch": "x"}, params) == []
    assert unknown_conf_keys(None, params) == []
    assert unknown_conf_keys({"epoch": 3, "zzz": 1}, params) == ["epoch (did you mean epochs?)", "zzz"]
    context = {"dag_run": SimpleNamespace(conf={"epoch": 3}), "dag": SimpleNamespace(dag_id="d", params=params)}
    with pytest.raises(AirflowFailException, match=r"d does not know: epoch \(did you mean epochs\?\)"):
        refuse_unknown_conf(context)
    refuse_unknown_conf({"dag_run": SimpleNamespace(conf={}), "dag": SimpleNamespace(dag_id="d", params=params)})
    # only the run's first tasks check: a run in flight when a release renames a Param goes on
    refuse_unknown_conf({**context, "task": SimpleNamespace(upstream_task_ids={"choose_start"})})
    with pytest.raises(AirflowFailException):
        refuse_unknown_conf({**context, "task": SimpleNamespace(upstream_task_ids=set())})
    assert task_defaults()["pre_execute"] is refuse_unknown_conf
