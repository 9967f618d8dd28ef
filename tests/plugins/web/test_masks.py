"""The "Masks to check" page and its API on a real Airflow api-server: list the pairs the mask audit
flagged, keep / exclude / fix them (a corrected mask uploaded as a file), refusals for the wrong
users and unfit files; and the page in headless Chromium (Debian's ``chromium``, never a
downloaded browser): tiles shown, Exclude and Fix clicked, the answers saved in the log."""

from __future__ import annotations

import re

import cv2
import httpx
import numpy as np
import pandas as pd
import pytest

from tasks.core import layout, storage
from tasks.core.manifest import read_table, write_table
from tasks.data.review import apply_review, fixed_mask_url, load_review_state
from tasks.dev.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.integration

VERSION = "masks-v1"
REASONS = {1: "speckle,ragged", 2: "holes", 4: "edges"}  # row index -> audit reasons


@pytest.fixture()
def flagged_dataset(s3_bucket):
    """Six synthetic clean pairs in S3, proposed in two clusters, three masks flagged by the audit.

    Yields ``(bucket, dataset_url, options, rows)`` (``rows``: the manifest rows as written).
    """
    bucket_url, options = s3_bucket
    url = layout.dataset(bucket_url, VERSION)
    rows = write_synthetic_dataset(url, n=6, seed=2, max_side=160, storage_options=options)
    keys = [r["key"] for r in rows]
    assignments = pd.DataFrame({
        "stem": keys, "key": keys, "cluster": [i % 2 for i in range(6)],
        "proposed_name": ["tops" if i % 2 == 0 else "pants" for i in range(6)], "distance": np.zeros(6),
    })
    write_table(assignments, storage.join(layout.clusters(url), "assignments.parquet"), options)
    manifest_url = layout.manifest(url)
    manifest = read_table(manifest_url, options)
    manifest["audit_reasons"] = [REASONS.get(i, "") for i in range(6)]
    manifest["audit_decision"] = ""
    write_table(manifest, manifest_url, options)
    return bucket_url.removeprefix("s3://"), url, options, rows


def mask_png(row: dict, dx: int = 0) -> bytes:
    """A plausible corrected mask of the row's clean-pair size (a centred box)."""
    mask = np.zeros((row["height"], row["width"] + dx), np.uint8)
    mask[row["height"] // 4: 3 * row["height"] // 4, row["width"] // 4: 3 * row["width"] // 4] = 255
    return cv2.imencode(".png", mask)[1].tobytes()


def test_anonymous_is_refused_and_a_viewer_can_only_look(api_server, client_for, flagged_dataset):
    bucket, _, _, rows = flagged_dataset
    key = rows[1]["key"]
    api = f"/bgremoval/api/datasets/{VERSION}/masks"
    anonymous, viewer = client_for(None), client_for("viewer")
    assert anonymous.status("GET", f"{api}?bucket={bucket}") == 401
    assert anonymous.status("GET", f"{api}/{key}/thumbnail?bucket={bucket}") == 401
    assert anonymous.status("POST", f"{api}/{key}?bucket={bucket}", {"decision": "keep"}) == 401
    upload = httpx.post(f"{api_server}{api}/{key}/fix?bucket={bucket}", files={"file": ("m.png", mask_png(rows[1]), "image/png")})
    assert upload.status_code == 401
    page = httpx.get(f"{api_server}/bgremoval/review/{VERSION}/masks?bucket={bucket}", follow_redirects=False)
    assert page.status_code in (302, 303, 307) and "login" in page.headers["location"]

    assert viewer.status("GET", f"{api}?bucket={bucket}") == 200
    assert viewer.status("POST", f"{api}/{key}?bucket={bucket}", {"decision": "keep"}) == 403
    upload = httpx.post(f"{api_server}{api}/{key}/fix?bucket={bucket}", headers={"Authorization": f"Bearer {viewer.token}"},
                        files={"file": ("m.png", mask_png(rows[1]), "image/png")})
    assert upload.status_code == 403
    assert viewer.status("GET", f"{api}?bucket=Not_A_Bucket") == 400
    assert load_review_state(flagged_dataset[1], flagged_dataset[2]).corrections == []


def test_list_keep_exclude_and_fix_over_http_then_apply(api_server, reviewer, flagged_dataset):
    bucket, url, options, rows = flagged_dataset
    q = f"?bucket={bucket}"
    api = f"/bgremoval/api/datasets/{VERSION}/masks"
    keep, exclude, fix = (rows[i]["key"] for i in (1, 2, 4))

    listing = reviewer.request("GET", f"{api}{q}")
    assert (listing["flagged"], listing["undecided"]) == (3, 3)
    assert [(p["key"], p["reasons"], p["decision"]) for p in listing["pairs"]] == [
        (keep, ["speckle", "ragged"], ""), (exclude, ["holes"], ""), (fix, ["edges"], "")]
    assert listing["pairs"][0]["cluster"] == 1 and listing["pairs"][0]["cluster_name"] == "pants"
    assert reviewer.request("GET", f"/bgremoval/{listing['pairs'][0]['thumbnail']}")[:2] == b"\xff\xd8"

    reviewer.request("POST", f"{api}/{keep}{q}", {"decision": "exclude"})
    kept = reviewer.request("POST", f"{api}/{keep}{q}", {"decision": "keep"})  # the last answer wins
    assert {p["key"]: p["decision"] for p in kept["pairs"]} == {keep: "keep", exclude: "", fix: ""}
    excluded = reviewer.request("POST", f"{api}/{exclude}{q}", {"decision": "exclude"})
    assert excluded["decided"] == {"keep": 1, "exclude": 1, "fix": 0} and excluded["undecided"] == 1

    assert reviewer.status("POST", f"{api}/{fix}{q}", {"decision": "fix"}) == 422  # fix needs a file
    assert reviewer.status("POST", f"{api}/{rows[0]['key']}{q}", {"decision": "keep"}) == 422  # not flagged
    assert reviewer.status("POST", f"{api}/nope{q}", {"decision": "keep"}) == 422

    headers = {"Authorization": f"Bearer {reviewer.token}"}
    fix_url = f"{api_server}{api}/{fix}/fix{q}"
    wrong = httpx.post(fix_url, headers=headers, files={"file": ("m.png", mask_png(rows[4], dx=3), "image/png")})
    assert wrong.status_code == 422 and "same size" in wrong.json()["detail"]
    not_png = httpx.post(fix_url, headers=headers, files={"file": ("m.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64, "image/jpeg")})
    assert not_png.status_code == 422 and "not a PNG" in not_png.json()["detail"]
    huge = httpx.post(fix_url, headers=headers, files={"file": ("m.png", b"\x89PNG" + b"\0" * (20 * 2**20), "image/png")})
    assert huge.status_code == 413
    assert list(storage.list_objects(storage.join(url, "review", "masks"), options)) == []  # nothing written
    fixed = httpx.post(fix_url, headers=headers, files={"file": ("m.png", mask_png(rows[4]), "image/png")})
    assert fixed.status_code == 200, fixed.text
    pair = {p["key"]: p for p in fixed.json()["pairs"]}[fix]
    assert (pair["decision"], pair["decided_by"]) == ("fix", "reviewer")
    assert pair["thumbnail"].endswith(f"&fixed={pair['fixed_file']}") and pair["fixed_file"].startswith(f"{fix}-")
    assert reviewer.request("GET", f"/bgremoval/{pair['thumbnail']}")[:2] == b"\xff\xd8"
    for name in ("..", ".", f"{keep}-0123456789ab.png"):  # only this pair's own uploads are named
        assert reviewer.status("GET", f"{api}/{fix}/thumbnail{q}&fixed={name}") == 400, name
    fixed_url = fixed_mask_url(url, fix, pair["fixed_file"])
    stored = cv2.imdecode(np.frombuffer(storage.read_bytes(fixed_url, options), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(stored, cv2.imdecode(np.frombuffer(mask_png(rows[4]), np.uint8), cv2.IMREAD_UNCHANGED))

    page = reviewer.request("GET", f"/bgremoval/review/{VERSION}/masks{q}").decode()
    assert all(f'data-key="{k}"' in page for k in (keep, exclude, fix)) and "Masks to check" in page
    clusters_page = reviewer.request("GET", f"/bgremoval/review/{VERSION}{q}").decode()
    assert f'href="{VERSION}/masks?bucket={bucket}"' in clusters_page
    assert reviewer.request("GET", f"/bgremoval/api/datasets/{VERSION}/clusters{q}")["masks_flagged"] == 3
    assert 'id="closed"' not in page and " disabled>" not in page and listing["closed"] is False

    summary = apply_review(url, options)
    assert summary["masks"] == {"flagged": 3, "kept": 1, "excluded": 1, "fixed": 1, "undecided": 0}
    # once approved, both pages say so and offer no control
    closed_page = reviewer.request("GET", f"/bgremoval/review/{VERSION}/masks{q}").decode()
    assert 'id="closed"' in closed_page and closed_page.count(" disabled>") == 9  # 3 tiles x Keep, Exclude, Fix
    assert reviewer.request("GET", f"/bgremoval/api/datasets/{VERSION}/clusters{q}")["closed"] is True
    assert reviewer.status("POST", f"{api}/{keep}{q}", {"decision": "exclude"}) == 409
    manifest = read_table(layout.manifest(url), options).set_index("key")
    assert manifest.loc[[keep, exclude, fix], "audit_decision"].tolist() == ["keep", "exclude", "fixed"]
    assert manifest.loc[fix, "mask_url"] == fixed_url
    assert manifest.loc[keep, "mask_url"] == rows[1]["mask_url"]


def test_masks_page_in_a_browser_exclude_and_fix(browser, save_screenshot, api_server, flagged_dataset, passwords, tmp_path):
    from playwright.sync_api import expect

    bucket, url, options, rows = flagged_dataset
    exclude, fix = rows[2]["key"], rows[4]["key"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api_server}/bgremoval/review/{VERSION}?bucket={bucket}")
    page.get_by_label("Username").fill("reviewer")
    page.get_by_label("Password").fill(passwords["reviewer"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/bgremoval/review/{VERSION}**", timeout=30_000)
    link = page.locator("#masks-link")
    expect(link).to_contain_text("3 flagged", timeout=30_000)
    link.click()
    page.wait_for_url(f"**/bgremoval/review/{VERSION}/masks**", timeout=30_000)

    tiles = page.locator("article.tile")
    expect(tiles).to_have_count(3)
    tile = page.locator(f'article.tile[data-key="{exclude}"]')
    expect(tile.locator(".reasons li")).to_have_text(["holes"])
    expect(tile.locator(".decision")).to_have_text("undecided")
    expect(tile.locator("img")).to_have_js_property("complete", True)
    assert tile.locator("img").evaluate("img => img.naturalWidth") > 0

    tile.get_by_role("button", name="Exclude").click()
    expect(page.get_by_role("status")).to_contain_text("saved", timeout=30_000)
    expect(tile.locator(".decision")).to_have_text("excluded by reviewer")
    expect(tile).to_have_class("tile exclude")

    fix_tile = page.locator(f'article.tile[data-key="{fix}"]')
    mask_file = tmp_path / "fixed.png"
    mask_file.write_bytes(mask_png(rows[4]))
    with page.expect_file_chooser() as chooser:
        fix_tile.get_by_role("button", name="Fix").click()
    chooser.value.set_files(str(mask_file))
    expect(fix_tile.locator(".decision")).to_have_text("fixed by reviewer", timeout=30_000)
    expect(fix_tile.locator("img")).to_have_attribute("src", re.compile(rf"fixed={re.escape(fix)}-[0-9a-f]{{12}}\.png"))
    save_screenshot(page, "mask-review-page.png")

    page.reload()  # what was saved is what the server now serves
    expect(page.locator(f'article.tile[data-key="{exclude}"] .decision')).to_have_text("excluded by reviewer")
    state = load_review_state(url, options)
    assert state.mask_decisions == {exclude: "exclude", fix: "fix"}
    assert [(c.user, c.action, c.key, c.decision) for c in state.corrections] == [
        ("reviewer", "mask", exclude, "exclude"), ("reviewer", "mask", fix, "fix")]
