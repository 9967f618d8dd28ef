"""A small HTTP client for Airflow's REST API and the bgremoval review pages (no Airflow import).

Used by the demo to play the reviewer exactly as a person's clicks would: the review page's API
for corrections, ``PATCH .../hitlDetails`` for Approve / Reject.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class AirflowHTTPError(RuntimeError):
    """An Airflow or review-page request that did not succeed; carries the status and body."""

    def __init__(self, method: str, path: str, status: int, body: object):
        super().__init__(f"{method} {path} -> {status}: {body}")
        self.status = status
        self.body = body


class AirflowClient:
    """Requests against one Airflow api-server as one user (bearer token from ``/auth/token``).

    With ``username=None`` the client is anonymous (no credentials at all).
    """

    def __init__(self, base_url: str, username: str | None, password: str | None = None, timeout: float = 60):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token = None
        if username is not None:
            login = {"username": username, "password": password}
            self.token = self.request("POST", "/auth/token", login)["access_token"]

    def status(self, method: str, path: str, body: dict | None = None) -> int:
        """The HTTP status ``method path`` gets (for checking refusals) — 2xx or the error code."""
        try:
            self.request(method, path, body)
        except AirflowHTTPError as error:
            return error.status
        return 200

    def request(self, method: str, path: str, body: dict | None = None):
        """Send one request; returns the parsed JSON (or bytes); raises :class:`AirflowHTTPError`."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload, kind = response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                detail = json.loads(raw)
            except ValueError:
                detail = raw[:500]
            raise AirflowHTTPError(method, path, error.code, detail) from None
        return json.loads(payload) if "json" in kind and payload else payload

    def waiting_human_tasks(self, dag_id: str) -> list[dict]:
        """The HITL details of every task of ``dag_id`` (any run) that waits for a human answer now."""
        details = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/~/hitlDetails")["hitl_details"]
        return [d for d in details if not d.get("response_received")]

    def wait_for_human_task(self, dag_id: str, timeout: float = 900, poll: float = 1.0) -> dict:
        """Wait until a task of ``dag_id`` asks for a human answer; return its HITL detail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = self.waiting_human_tasks(dag_id)
            if waiting:
                return waiting[0]
            time.sleep(poll)
        raise TimeoutError(f"no task of {dag_id} asked for a human answer within {timeout:.0f} s")

    def answer(self, detail: dict, option: str) -> dict:
        """Answer a waiting human-in-the-loop task with ``option`` (what Required Actions does)."""
        ti = detail["task_instance"]
        path = (
            f"/api/v2/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/"
            f"{ti['task_id']}/{ti['map_index']}/hitlDetails"
        )
        return self.request("PATCH", path, {"chosen_options": [option], "params_input": {}})
