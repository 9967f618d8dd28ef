"""The review page in a real browser: log in to Airflow, open the page, move one image, see it saved.

Headless Chromium from Debian's ``chromium`` package, driven by Playwright with ``executable_path``
(never a downloaded browser). Skips when the binary is missing, except under ``CI=true``.
"""

from __future__ import annotations


import pytest

from tasks.data import ingest
from tasks.core import layout
from tasks.data.cleaning import CleaningConfig
from tasks.data.clustering import ClusteringConfig, cluster_dataset
from tasks.data.features import extract_shard_features, plan_feature_shards
from tasks.data.review import apply_review, load_review_state, record_rejection
from tasks.dev.synth import SynthConfig, generate_catalogue

pytestmark = pytest.mark.integration


@pytest.fixture()
def clustered_dataset(s3_bucket):
    """A small generated catalogue in S3, cleaned, featurised and clustered; yields (bucket, version, url, options)."""
    bucket_url, options = s3_bucket
    generate_catalogue(layout.raw_batch(bucket_url, "web"), SynthConfig(n=36, seed=4, max_side=320), options)
    config = CleaningConfig(working_size=160)
    plan = ingest.plan_batch(bucket_url, "web", config, storage_options=options)
    results = [ingest.clean_shard(u, plan["dataset_url"], "web", config, options) for u in plan["shard_urls"]]
    ingest.finalize_dataset(plan["dataset_url"], "web", [r["result_url"] for r in results], plan["listing_rejects_url"], options)
    features = [extract_shard_features(**s, storage_options=options) for s in plan_feature_shards(plan["dataset_url"], 100, options)]
    cluster_dataset(plan["dataset_url"], [f["features_url"] for f in features], ClusteringConfig(k=6, seed=0), storage_options=options)
    return bucket_url.removeprefix("s3://"), plan["version"], plan["dataset_url"], options


def test_log_in_open_review_page_move_one_image_and_see_it_saved(
    browser, save_screenshot, api_server, clustered_dataset, passwords, tmp_path
):
    from playwright.sync_api import expect

    bucket, version, dataset_url, options = clustered_dataset
    before = load_review_state(dataset_url, options)
    key = before.members(0)[0]
    target = 2
    page_url = f"{api_server}/bgremoval/review/{version}?bucket={bucket}"

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(page_url)
    page.get_by_label("Username").fill("reviewer")
    page.get_by_label("Password").fill(passwords["reviewer"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/bgremoval/review/{version}**", timeout=30_000)
    expect(page.locator("section.cluster")).to_have_count(6, timeout=30_000)
    expect(page.get_by_role("status")).to_contain_text("0 corrections")

    page.locator(f'select[data-key="{key}"]').select_option(str(target))
    expect(page.get_by_role("status")).to_contain_text("saved", timeout=30_000)
    moved_card = page.locator(f'section[data-cluster="{target}"] .card.moved[data-key="{key}"]')
    expect(moved_card).to_be_visible()
    expect(moved_card.locator("img")).to_have_js_property("complete", True)
    page.screenshot(path=str(tmp_path / "review-page.png"), full_page=False)
    save_screenshot(page, "review-page.png")

    page.reload()  # what was saved is what the server now serves
    expect(page.locator(f'section[data-cluster="{target}"] .card.moved[data-key="{key}"]')).to_be_visible()

    after = load_review_state(dataset_url, options)
    assert after.cluster_of[key] == target
    assert [(c.user, c.action, c.key) for c in after.corrections] == [("reviewer", "move", key)]

    name = page.get_by_label("name of cluster 0")
    saved_name = name.input_value()
    name.fill("")  # refused: the box shows the saved name again, not the blank
    page.locator('section[data-cluster="0"]').get_by_role("button", name="Rename").click()
    expect(page.get_by_role("status")).to_contain_text("not saved", timeout=30_000)
    expect(page.get_by_label("name of cluster 0")).to_have_value(saved_name)

    record_rejection(dataset_url, "lead", options)  # the gate's Reject: said on the page; the review stays open
    page.reload()
    expect(page.locator("#rejected")).to_contain_text("Rejected by lead", timeout=30_000)
    expect(page.get_by_label("name of cluster 0")).to_be_enabled()

    apply_review(dataset_url, options)  # Approve, from another tab: this one learns it from its next change
    page.get_by_label("name of cluster 0").fill("renamed too late")
    page.locator('section[data-cluster="0"]').get_by_role("button", name="Rename").click()
    expect(page.get_by_role("status")).to_contain_text("not saved", timeout=30_000)
    expect(page.locator("#closed")).to_be_visible(timeout=30_000)  # read again: closed, no control offered
    expect(page.locator("#rejected")).to_be_hidden()
    expect(page.locator(f'select[data-key="{key}"]')).to_be_disabled()
    expect(page.get_by_role("button", name="Rename").first).to_be_disabled()
