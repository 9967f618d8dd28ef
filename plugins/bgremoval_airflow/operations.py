"""How every bgremoval task behaves on a bad day: a time limit, retries with backoff where a retry
is safe (the stage functions are idempotent, DESIGN.md), and a notice of every failure.

:func:`task_defaults` is each DAG's ``default_args``; tasks that legitimately run long (training)
or wait for people (the review gate) override the limit in the DAG file; :func:`review_gate`
gives the review its assignees, its deadline and its notice; :func:`training_deadline` is the
training DAG's deadline alert (:func:`run_overdue` runs in the triggerer when a run is late). A
failure or a missed deadline is always logged as one structured line and, when ``[bgremoval]
failure_email`` names addresses, also mailed through the SMTP connection ``[bgremoval] smtp_conn_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseNotifier
from bgremoval_airflow.settings import (
    failure_recipients,
    review_timeout_hours,
    reviewers,
    smtp_conn_id,
    training_deadline_hours,
)

log = logging.getLogger("bgremoval.operations")

#: The time limit of a task that sets none: an S3 listing, a shard of cleaning or inference.
TASK_TIMEOUT = timedelta(hours=2)
#: Training's limit: the seed's workload took 9 h on 20 GPUs; a hung torchrun must not hold a worker forever.
TRAINING_TIMEOUT = timedelta(hours=24)


class FailureLog(BaseNotifier):
    """Logs one line per failed task: DAG, task, map index, run, try and the reason."""

    template_fields = ()

    def notify(self, context: dict[str, Any]) -> None:
        """Write the line (``context`` is the failed task's Airflow context)."""
        ti = context.get("ti") or context.get("task_instance")
        log.error("task failed: dag=%s task=%s map_index=%s run=%s try=%s reason=%s",
                  getattr(ti, "dag_id", "?"), getattr(ti, "task_id", "?"), getattr(ti, "map_index", -1),
                  getattr(ti, "run_id", "?"), getattr(ti, "try_number", "?"), failure_reason(context.get("exception"))[:500])


def failure_reason(exception: BaseException | str | None) -> str:
    """What failed, in a line: the exception's text, and the server's ``detail`` behind an API error
    (the execution API answers "Server returned error" and puts the reason there)."""
    reason = str(exception or "")
    detail = getattr(exception, "detail", None)
    return f"{reason}: {detail}" if detail and str(detail) not in reason else reason


def failure_notifiers() -> list[BaseNotifier]:
    """The log line, plus a mail when ``[bgremoval] failure_email`` is set."""
    notifiers: list[BaseNotifier] = [FailureLog()]
    recipients = failure_recipients()
    if recipients:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        notifiers.append(SmtpNotifier(to=list(recipients), smtp_conn_id=smtp_conn_id(),
                                      subject="bgremoval: {{ ti.dag_id }}.{{ ti.task_id }} failed ({{ run_id }})"))
    return notifiers


def task_defaults(retries: int = 2) -> dict[str, Any]:
    """``default_args`` for a bgremoval DAG: :data:`TASK_TIMEOUT`, ``retries`` with exponential
    backoff from one minute up to twenty, :func:`failure_notifiers` on failure, and
    :func:`refuse_unknown_conf` before each task."""
    return {
        "pre_execute": refuse_unknown_conf,
        "execution_timeout": TASK_TIMEOUT,
        "retries": retries,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=20),
        "on_failure_callback": failure_notifiers(),
    }


def unknown_conf_keys(conf: dict[str, Any] | None, params: Any) -> list[str]:
    """The keys of a run's ``conf`` that name none of the DAG's ``params``, each with the closest
    Param's name when one is close (``"epoch (did you mean epochs?)"``)."""
    known = list(params.keys()) if params is not None else []
    unknown = []
    for key in sorted(set(conf or {}) - set(known)):
        close = difflib.get_close_matches(key, known, n=1)
        unknown.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return unknown


def refuse_unknown_conf(context: dict[str, Any]) -> None:
    """Each task's ``pre_execute``: a run triggered with a conf key the DAG has no Param for (a typo
    such as ``epoch``) fails in its first tasks, without retries, instead of running with that
    setting's default. Tasks with upstream tasks do not check again: a run in flight when a new
    release renames a Param goes on (Airflow still validates the values of the Params it knows at
    each task's start)."""
    from airflow.sdk.exceptions import AirflowFailException

    task = context.get("task")
    if task is not None and task.upstream_task_ids:
        return
    dag_run, dag = context.get("dag_run"), context.get("dag")
    unknown = unknown_conf_keys(getattr(dag_run, "conf", None), getattr(dag, "params", None))
    if unknown:
        raise AirflowFailException(
            f"the run's conf has keys {getattr(dag, 'dag_id', 'this DAG')} does not know: {', '.join(unknown)}; "
            "trigger it again with the Params' names (the trigger form lists them)")


class ReviewRequested(BaseNotifier):
    """Logs one line when a review starts waiting: which run, for whom, until when."""

    template_fields = ()

    def notify(self, context: dict[str, Any]) -> None:
        """Write the line (``context`` is the review task's Airflow context)."""
        ti = context.get("ti") or context.get("task_instance")
        log.warning("review requested: dag=%s run=%s task=%s assigned=%s answer within %g h (then: Reject)",
                    getattr(ti, "dag_id", "?"), getattr(ti, "run_id", "?"), getattr(ti, "task_id", "?"),
                    ", ".join(reviewers()) or "anyone", review_timeout_hours())


def review_gate() -> dict[str, Any]:
    """Keyword arguments of the cluster review's ``ApprovalOperator``: assigned to ``[bgremoval]
    reviewers``, rejected after ``[bgremoval] review_timeout_hours`` without an answer, announced
    by :class:`ReviewRequested`, never retried and without a task time limit (people take days)."""
    from airflow.sdk.execution_time.hitl import HITLUser

    users = [HITLUser(id=name, name=name) for name in reviewers()]
    return {
        "assigned_users": users or None,
        "response_timeout": timedelta(hours=review_timeout_hours()),
        "defaults": "Reject",
        "notifiers": [ReviewRequested()],
        "retries": 0,
        "execution_timeout": None,
    }


async def run_overdue(dag_id: str, hours: float, context: dict | None = None) -> str:
    """The deadline alert's callback (runs in the triggerer): log that a run of ``dag_id`` is still
    not done ``hours`` after it was queued, and mail ``[bgremoval] failure_email`` when set.
    Returns the line."""
    run = (context or {}).get("dag_run") or {}
    run_id = run.get("run_id", "?") if isinstance(run, dict) else getattr(run, "run_id", "?")
    line = f"run overdue: dag={dag_id} run={run_id} not finished {hours:g} h after it was queued"
    log.error(line)
    recipients = failure_recipients()
    if recipients:
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        def mail() -> None:
            with SmtpHook(smtp_conn_id=smtp_conn_id()) as hook:
                hook.send_email_smtp(to=list(recipients), subject=f"bgremoval: {dag_id} run {run_id} is overdue",
                                     html_content=line)

        await asyncio.to_thread(mail)
    return line


def training_deadline(dag_id: str):
    """The training DAG's ``deadline``: :func:`run_overdue` when a run is not finished
    ``[bgremoval] training_deadline_hours`` after it was queued; None when that setting is 0."""
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    hours = training_deadline_hours()
    if hours <= 0:
        return None
    return DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(hours=hours),
                         callback=AsyncCallback(run_overdue, kwargs={"dag_id": dag_id, "hours": hours}),
                         name="training run overdue")


def gate_passed(gate: dict[str, Any], on_failure: str) -> bool:
    """The ``check_gate`` task's answer to an assessment's ``gate``: True when it passed; when it
    failed, its reasons either fail the task (``on_failure="fail"``: the run ends failed and the
    failure notices fire, without retries) or are printed and promotion is skipped (``"skip"``)."""
    from airflow.sdk.exceptions import AirflowFailException

    if gate["passed"]:
        return True
    reasons = "gate FAILED, promotion skipped:\n  " + "\n  ".join(gate["reasons"])
    if on_failure == "fail":
        raise AirflowFailException(reasons)
    print(reasons)
    return False


@contextlib.contextmanager
def fail_at_once(*errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` raised inside into a task failure without retries: what waiting cannot mend (a
    form whose values do not go together, a registered model without a champion)."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except errors as exc:
        raise AirflowFailException(str(exc)) from exc
