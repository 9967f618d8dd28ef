"""The operators the DAGs use beyond the providers': the cluster review's gate, and the Databricks
submission whose token changes with each try."""

from __future__ import annotations

from typing import Any

from airflow.providers.databricks.operators.databricks import DatabricksSubmitRunOperator
from airflow.providers.standard.operators.hitl import ApprovalOperator

from bgremoval_airflow.connections import s3_storage_options
from bgremoval_airflow.databricks import try_token


class TrainOnDatabricks(DatabricksSubmitRunOperator):
    """``runs/submit`` of the training payload (``json``, from :func:`bgremoval_airflow.databricks.submit_run_json`)
    with the payload's idempotency token made a try's (:func:`bgremoval_airflow.databricks.try_token`):
    a retry, or the task cleared, follows the run the previous try started while that run still goes
    or has succeeded (the try was lost, not the run: no second cluster), and starts a new run when it
    ended otherwise (a lost spot instance, a crashed driver) instead of being answered with it."""

    def execute(self, context: Any) -> Any:
        token = self.json.get("idempotency_token") if isinstance(self.json, dict) else None
        if token:
            self.idempotency_token = self.token_for_try(token, context["ti"].try_number, context)
        return super().execute(context)

    def token_for_try(self, token: str, try_number: int, context: Any) -> str:
        """The token try ``try_number`` submits with: the first of the tries' tokens (``try_token(token,
        k)``, k = 1, 2, ...) whose run has not ended unsuccessfully, so that the run an earlier try
        started, and a later try followed, is followed again while it goes or once it succeeded.
        Asking for a token's run is its submission again (a used token answers with its run); the
        first unused token starts the one new run, which is then followed."""
        for k in range(1, max(1, try_number)):
            self.idempotency_token = try_token(token, k)  # named parameters override the payload's
            run_id = self._hook.submit_run(self._prepare_submit_json(context))
            state = self._hook.get_run_state(run_id)
            if not _ended_unsuccessfully(state):
                self.log.info("following run %s (token of try %d): %s", run_id, k, state)
                return self.idempotency_token
            self.log.info("run %s (token of try %d) ended %s", run_id, k, state)
        return try_token(token, max(1, try_number))


def _ended_unsuccessfully(state: Any) -> bool:
    """Whether a Databricks run is over without success (a run still TERMINATING counts once its
    result is known to be other than SUCCESS)."""
    result = getattr(state, "result_state", "") or ""
    return (state.is_terminal and not state.is_successful) or (bool(result) and result != "SUCCESS")


class ClusterReviewGate(ApprovalOperator):
    """The cluster review's Approve / Reject in Required Actions. A Reject (a reviewer's, or the
    timeout's default) is also recorded with the review (:func:`tasks.data.review.record_rejection`),
    so that the review page and the start page say the run ended there instead of still asking for
    an answer. ``dataset_url`` (templated) is the reviewed dataset version."""

    template_fields = (*ApprovalOperator.template_fields, "dataset_url")

    def __init__(self, *, dataset_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset_url = dataset_url

    def execute(self, context: Any) -> Any:
        """Ask again: a Reject of an earlier run is forgotten (the pages show the review as waiting)."""
        from tasks.data.review import clear_rejection

        try:
            clear_rejection(self.dataset_url, s3_storage_options())
        except Exception:  # noqa: BLE001 - the question stands; the pages only show the old answer
            self.log.exception("the earlier Reject of the review of %s could not be cleared", self.dataset_url)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """Record a Reject, then skip what follows as :class:`ApprovalOperator` does (its skip ends the
        task by raising, so the record comes first)."""
        if "error" not in event and event.get("chosen_options") == [self.REJECT]:
            self._record_rejection(event.get("responded_by_user") or {})
        return super().execute_complete(context=context, event=event)

    def _record_rejection(self, user: dict[str, Any]) -> None:
        from tasks.data.review import record_rejection

        try:
            recorded = record_rejection(self.dataset_url, user.get("name") or user.get("id"), s3_storage_options())
        except Exception:  # noqa: BLE001 - the answer stands; the pages only miss its record
            self.log.exception("the Reject could not be recorded with the review of %s", self.dataset_url)
        else:
            self.log.info("Reject recorded with the review of %s: %s", self.dataset_url, recorded)
