"""The correction flow end to end over HTTP: queue → accept / correct / reject through the correction
page's API on a real Airflow api-server → decisions in ``corrections/done/`` and pairs in the retraining pool."""

from __future__ import annotations

import base64

import cv2
import httpx
import numpy as np
import pytest

from tasks.feedback import queue as corrections
from tasks.core import layout, storage
from tasks.dev.airflow_client import AirflowHTTPError
from tasks.dev.synth import SynthConfig, encode_jpeg, encode_png, render_item

pytestmark = pytest.mark.integration


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture()
def queued(s3_bucket):
    """Four synthetic products queued with a predicted mask that misses the lower quarter of the product.

    Yields ``(bucket, bucket_url, options, {stem: (item_id, truth, predicted)})``.
    """
    bucket_url, options = s3_bucket
    items = {}
    for index, stem in enumerate(["accept-me", "upload-me", "paint-me", "reject-me"]):
        synth = render_item(index, SynthConfig(n=4, seed=3, max_side=240))
        ys = np.nonzero(synth.mask.any(axis=1))[0]
        predicted = synth.mask.copy()
        predicted[ys[0] + 3 * (ys[-1] - ys[0]) // 4:] = 0
        item = corrections.QueueItem(stem=stem, batch="web-7", source_url=f"{bucket_url}/incoming/web-7/{stem}.jpg",
                                     score=0.5 + index / 100, threshold=0.8, model_version="4",
                                     created_at=f"2030-01-01T00:00:0{index}+00:00")
        corrections.enqueue(bucket_url, item, encode_jpeg(synth.image), encode_png(predicted), options)
        items[stem] = (item.item_id, synth.mask, predicted)
    return bucket_url.removeprefix("s3://"), bucket_url, options, items


def test_anonymous_is_refused_and_a_viewer_can_only_look(api_server, client_for, queued):
    bucket, _, _, items = queued
    item_id = items["accept-me"][0]
    api = f"/bgremoval/api/corrections/{item_id}"
    anonymous, viewer = client_for(None), client_for("viewer")
    assert anonymous.status("GET", f"/bgremoval/api/corrections?bucket={bucket}") == 401
    assert anonymous.status("GET", f"{api}/image?bucket={bucket}") == 401
    assert anonymous.status("POST", f"{api}/decision?bucket={bucket}", {"decision": "accepted"}) == 401
    page = httpx.get(f"{api_server}/bgremoval/corrections?bucket={bucket}", follow_redirects=False)
    assert page.status_code in (302, 303, 307) and "login" in page.headers["location"]

    assert viewer.status("GET", f"/bgremoval/api/corrections?bucket={bucket}") == 200
    assert viewer.status("GET", f"{api}/mask?bucket={bucket}") == 200
    assert viewer.status("POST", f"{api}/decision?bucket={bucket}", {"decision": "accepted"}) == 403
    upload = httpx.post(f"{api_server}{api}/upload?bucket={bucket}", headers={"Authorization": f"Bearer {viewer.token}"},
                        files={"file": ("mask.png", encode_png(items["accept-me"][1]), "image/png")})
    assert upload.status_code == 403
    assert viewer.status("GET", f"/bgremoval/api/corrections?bucket=Not_A_Bucket") == 400
    assert viewer.status("GET", f"/bgremoval/api/corrections/..%2Fx?bucket={bucket}") in (400, 404)


def test_queue_then_accept_correct_reject_over_http_fills_the_retraining_pool(api_server, reviewer, queued):
    bucket, bucket_url, options, items = queued
    q = f"?bucket={bucket}"
    listing = reviewer.request("GET", f"/bgremoval/api/corrections{q}")
    assert [i["stem"] for i in listing["items"]] == ["accept-me", "upload-me", "paint-me", "reject-me"]
    assert listing["open"] == 4 and all(i["status"] == "open" for i in listing["items"])
    second = reviewer.request("GET", f"/bgremoval/api/corrections{q}&offset=1&limit=2")  # a page
    assert [i["stem"] for i in second["items"]] == ["upload-me", "paint-me"] and second["total"] == 4

    accept_id, truth, predicted = items["accept-me"]
    api = f"/bgremoval/api/corrections/{accept_id}"
    meta = reviewer.request("GET", f"{api}{q}")
    assert meta["next_open"] == items["upload-me"][0] and meta["score"] == pytest.approx(0.5)
    assert reviewer.request("GET", f"{api}/image{q}")[:2] == b"\xff\xd8"
    assert np.array_equal(decode(reviewer.request("GET", f"{api}/mask{q}")), predicted)
    assert reviewer.request("GET", f"{api}/thumbnail{q}")[:2] == b"\xff\xd8"
    queue_page = reviewer.request("GET", f"/bgremoval/corrections{q}").decode()
    assert all(f'data-item="{item_id}"' in queue_page for item_id, _, _ in items.values())
    editor = reviewer.request("GET", f"/bgremoval/corrections/{accept_id}{q}").decode()
    assert "Save correction" in editor and "<canvas" in editor

    decided = reviewer.request("POST", f"{api}/decision{q}", {"decision": "accepted", "note": "fine"})
    assert (decided["decision"], decided["user"], decided["mask_source"], decided["note"]) == ("accepted", "reviewer", "predicted", "fine")
    with pytest.raises(AirflowHTTPError) as again:
        reviewer.request("POST", f"{api}/decision{q}", {"decision": "rejected"})
    assert again.value.status == 409 and "already accepted by reviewer" in again.value.body["detail"]

    # Correct by uploading a mask file (multipart), after a refused one of the wrong size.
    upload_id, upload_truth, _ = items["upload-me"]
    headers = {"Authorization": f"Bearer {reviewer.token}"}
    upload_url = f"{api_server}/bgremoval/api/corrections/{upload_id}/upload{q}"
    wrong = httpx.post(upload_url, headers=headers, files={"file": ("m.png", encode_png(upload_truth[:100, :100]), "image/png")})
    assert wrong.status_code == 422 and "same size" in wrong.json()["detail"]
    empty = httpx.post(upload_url, headers=headers, files={"file": ("m.png", encode_png(np.zeros_like(upload_truth)), "image/png")})
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    uploaded = httpx.post(upload_url, headers=headers, files={"file": ("m.png", encode_png(upload_truth), "image/png")},
                          data={"note": "hem was missing"})
    assert uploaded.status_code == 200, uploaded.text
    assert (uploaded.json()["decision"], uploaded.json()["mask_source"]) == ("corrected", "upload")

    # Correct with a mask sent as base64 in JSON (what the page's brush sends).
    paint_id, paint_truth, _ = items["paint-me"]
    mask_b64 = base64.b64encode(encode_png(paint_truth)).decode()
    painted = reviewer.request("POST", f"/bgremoval/api/corrections/{paint_id}/decision{q}",
                               {"decision": "corrected", "mask_png_base64": mask_b64, "mask_source": "brush"})
    assert painted["mask_source"] == "brush"

    reject_id = items["reject-me"][0]
    with pytest.raises(AirflowHTTPError) as bad:
        reviewer.request("POST", f"/bgremoval/api/corrections/{reject_id}/decision{q}", {"decision": "maybe"})
    assert bad.value.status == 422
    reviewer.request("POST", f"/bgremoval/api/corrections/{reject_id}/decision{q}", {"decision": "rejected", "note": "blurred"})

    assert reviewer.request("GET", f"/bgremoval/api/corrections{q}")["items"] == []
    everything = reviewer.request("GET", f"/bgremoval/api/corrections{q}&include_done=true")["items"]
    assert [(i["stem"], i["status"], i["decision"]["user"]) for i in everything] == [
        ("accept-me", "accepted", "reviewer"), ("upload-me", "corrected", "reviewer"),
        ("paint-me", "corrected", "reviewer"), ("reject-me", "rejected", "reviewer")]
    assert np.array_equal(decode(reviewer.request("GET", f"/bgremoval/api/corrections/{upload_id}/final-mask{q}")), upload_truth)
    # The queue's thumbnail of a corrected item shows the mask the reviewer kept, under a new link.
    thumbs = {i["stem"]: i["links"]["thumbnail"] for i in everything}
    assert thumbs["upload-me"].endswith("&decided=true") and "decided" not in thumbs["reject-me"]
    kept, predicted_thumb = (reviewer.request("GET", f"/bgremoval/{link}")
                             for link in (thumbs["upload-me"], thumbs["upload-me"].replace("&decided=true", "")))
    assert kept[:2] == b"\xff\xd8" and kept != predicted_thumb
    with pytest.raises(AirflowHTTPError) as undecided:
        reviewer.request("GET", f"/bgremoval/api/corrections/{reject_id}/thumbnail{q}&decided=true")
    assert undecided.value.status == 404

    # What the retraining DAG will read: the pool, with who and when.
    pool = {p["pair_id"]: p for p in corrections.list_pool(bucket_url, options)}
    assert set(pool) == {accept_id, upload_id, paint_id}
    assert [(pool[i]["origin"], pool[i]["user"]) for i in (accept_id, upload_id, paint_id)] == [
        ("accepted", "reviewer"), ("corrected", "reviewer"), ("corrected", "reviewer")]
    assert np.array_equal(decode(storage.read_bytes(pool[upload_id]["mask_url"], options)), upload_truth)
    assert np.array_equal(decode(storage.read_bytes(pool[accept_id]["mask_url"], options)), predicted)
    assert pool[upload_id]["source_url"] == f"{bucket_url}/incoming/web-7/upload-me.jpg" and pool[upload_id]["model_version"] == "4"
    decision = corrections.read_decision(bucket_url, upload_id, options)
    assert decision["user"] == "reviewer" and decision["note"] == "hem was missing" and decision["at"] == pool[upload_id]["at"]
    # The queue itself is untouched.
    assert len([o for o in storage.list_objects(layout.corrections_queue(bucket_url), options)]) == 4 * 3
