"""The correction page in a real browser: log in, open the queue, open an item, paint the missing part
of the mask with the brush, save, and find the corrected mask in storage and the pair in the pool;
then correct the next item by uploading a mask file.

Headless Chromium from Debian's ``chromium`` package, driven by Playwright with ``executable_path``
(never a downloaded browser). Skips when the binary is missing, except under ``CI=true``.
With ``BGREMOVAL_SCREENSHOTS=<folder>`` it also saves ``correction-page.png`` (half-way through
the brush work) there; ``docs/correction-page.png`` was made that way.
"""

from __future__ import annotations


import cv2
import numpy as np
import pytest

from tasks.feedback import queue as corrections
from tasks.core import layout, storage
from tasks.dev.synth import SynthConfig, encode_jpeg, encode_png, render_item

pytestmark = pytest.mark.integration


@pytest.fixture()
def queued_items(s3_bucket):
    """Three synthetic products queued; each predicted mask misses the lower quarter of the product.

    Returns ``(bucket, bucket_url, options, [(item_id, truth, predicted, cut_row)])``.
    """
    bucket_url, options = s3_bucket
    out = []
    for index in range(3):
        synth = render_item(index, SynthConfig(n=3, seed=38, max_side=640))
        ys = np.nonzero(synth.mask.any(axis=1))[0]
        cut = int(ys[0] + 3 * (ys[-1] - ys[0]) // 4)
        predicted = synth.mask.copy()
        predicted[cut:] = 0
        item = corrections.QueueItem(stem=synth.stem, batch="shop-3", source_url=f"{bucket_url}/incoming/shop-3/{synth.stem}.jpg",
                                     score=0.42 + index / 10, threshold=0.8, model_version="5",  # worst first
                                     created_at=f"2030-02-01T10:00:0{index}+00:00")
        corrections.enqueue(bucket_url, item, encode_jpeg(synth.image), encode_png(predicted), options)
        out.append((item.item_id, synth.mask, predicted, cut))
    return bucket_url.removeprefix("s3://"), bucket_url, options, out


def _strokes(truth: np.ndarray, cut: int, radius: float) -> list[tuple[int, int, int]]:
    """Horizontal brush strokes ``(row, x_start, x_end)`` in image pixels that paint the band the
    prediction missed (rows from ``cut`` down), run by run, inset by the brush radius."""
    out = []
    inset, step = int(np.ceil(radius)), max(1, int(radius))
    for y in range(cut + inset, int(np.nonzero(truth.any(axis=1))[0][-1]) - inset + 1, step):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], truth[y] > 0, [0]]).astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start > 2 * inset + 4:
                out.append((y, int(start) + inset, int(stop) - 1 - inset))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a > 0) & (b > 0)).sum() / ((a > 0) | (b > 0)).sum())


def test_log_in_open_an_item_paint_with_the_brush_and_save_the_correction(
    browser, save_screenshot, api_server, queued_items, passwords, tmp_path
):
    from playwright.sync_api import expect

    bucket, bucket_url, options, items = queued_items
    item_id, truth, predicted, cut = items[0]
    height, width = truth.shape

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api_server}/bgremoval/corrections?bucket={bucket}")
    page.get_by_label("Username").fill("reviewer")
    page.get_by_label("Password").fill(passwords["reviewer"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/bgremoval/corrections?**", timeout=30_000)
    expect(page.locator("#queue a.card")).to_have_count(3, timeout=30_000)
    expect(page.get_by_role("status")).to_contain_text("3 open")
    expect(page.locator("#queue img").first).to_have_js_property("complete", True)
    page.screenshot(path=str(tmp_path / "correction-queue.png"), full_page=False)

    page.locator(f'a.card[data-item="{item_id}"]').click()
    page.wait_for_url(f"**/bgremoval/corrections/{item_id}?**", timeout=30_000)
    expect(page.get_by_role("status")).to_contain_text("ready", timeout=30_000)
    expect(page.get_by_role("button", name="Save correction")).to_be_disabled()
    expect(page.get_by_role("button", name="Accept prediction")).to_be_enabled()

    canvas = page.locator("canvas#editor")
    box = canvas.bounding_box()
    to_screen = lambda x, y: (box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height)  # noqa: E731
    page.get_by_label("Brush size").fill("16")
    strokes = _strokes(truth, cut, radius=8 * width / box["width"])
    assert len(strokes) >= 3, "the synthetic product should leave a band to paint"
    for n, (y, xa, xb) in enumerate(strokes):  # paint the band the model missed, as a person would
        page.mouse.move(*to_screen(xa, y))
        if n == len(strokes) // 2:  # half-way: the page as a person sees it while correcting
            page.screenshot(path=str(tmp_path / "correction-page.png"), full_page=False)
            save_screenshot(page, "correction-page.png")
        page.mouse.down()
        page.mouse.move(*to_screen(xb, y), steps=max(2, (xb - xa) // 20))
        page.mouse.up()
    expect(page.get_by_role("status")).to_contain_text("edited")
    expect(page.get_by_role("button", name="Accept prediction")).to_be_disabled()
    page.get_by_label("Note (optional)").fill("hem was cut off")
    page.get_by_role("button", name="Save correction").click()
    expect(page.get_by_role("status")).to_contain_text("saved", timeout=30_000)
    expect(page.get_by_role("note")).to_contain_text("Corrected by reviewer")
    expect(page.get_by_role("link", name="Next open item →")).to_be_visible()
    page.screenshot(path=str(tmp_path / "correction-saved.png"), full_page=False)

    page.get_by_role("link", name="Next open item →").click()
    page.wait_for_url(f"**/bgremoval/corrections/{items[1][0]}?**", timeout=30_000)
    expect(page.get_by_role("status")).to_contain_text("ready", timeout=30_000)

    # The next one is corrected with a mask file: a wrong-sized file is refused, the right one saved.
    upload = page.get_by_label("Upload a mask file")
    upload.set_input_files({"name": "small.png", "mimeType": "image/png", "buffer": encode_png(items[1][1][:50, :50])})
    expect(page.get_by_role("status")).to_contain_text("not used")
    expect(page.get_by_role("button", name="Save correction")).to_be_disabled()
    height, width = items[1][1].shape  # the original photo's size, twice the page's copy: scaled to it
    original_size = cv2.resize(items[1][1], (2 * width, 2 * height), interpolation=cv2.INTER_NEAREST)
    upload.set_input_files({"name": "mask.png", "mimeType": "image/png", "buffer": encode_png(original_size)})
    expect(page.get_by_role("status")).to_contain_text("mask file loaded")
    page.get_by_role("button", name="Save correction").click()
    expect(page.get_by_role("note")).to_contain_text("mask: upload", timeout=30_000)

    decision = corrections.read_decision(bucket_url, item_id, options)
    assert (decision["decision"], decision["user"], decision["mask_source"], decision["note"]) == (
        "corrected", "reviewer", "brush", "hem was cut off")
    final = cv2.imdecode(np.frombuffer(storage.read_bytes(storage.join(layout.corrections_done(bucket_url), item_id, "mask.png"), options), np.uint8),
                         cv2.IMREAD_UNCHANGED)
    assert final.shape == predicted.shape and set(np.unique(final)) <= {0, 255}
    for y, xa, xb in strokes:  # every stroke turned background pixels of the prediction into product
        assert (predicted[y, xa:xb + 1] == 0).all() and (final[y, xa:xb + 1] == 255).all()
    assert np.array_equal(final[: cut - 20], predicted[: cut - 20])  # nothing far from the strokes changed
    assert _iou(final, truth) > max(0.95, _iou(predicted, truth) + 0.05), (_iou(final, truth), _iou(predicted, truth))

    uploaded = cv2.imdecode(np.frombuffer(corrections.read_item_file(bucket_url, items[1][0], "final_mask", options), np.uint8),
                            cv2.IMREAD_UNCHANGED)
    assert np.array_equal(uploaded, items[1][1])
    assert corrections.read_decision(bucket_url, items[1][0], options)["mask_source"] == "upload"

    pool = corrections.list_pool(bucket_url, options)
    assert [(p["pair_id"], p["origin"], p["user"]) for p in pool] == [
        (item_id, "corrected", "reviewer"), (items[1][0], "corrected", "reviewer")]
    assert [i["item_id"] for i in corrections.list_queue(bucket_url, options)] == [items[2][0]]
