"""The report page is rendered from its template, with every value escaped."""

from __future__ import annotations

from tasks.evaluation.report import write_report


def _summary(stem: str) -> dict:
    return {"n": 2, "mean_iou": 0.98, "share_at_least": {"0.95": 1.0, "0.99": 0.5}, "mean_mae": 0.01,
            "mean_boundary_f": 0.9, "clusters": {"tops & tees": {"n": 2, "mean_iou": 0.98}},
            "worst": [{"stem": stem, "cluster": "tops & tees", "iou": 0.97}]}


def test_the_page_holds_the_seed_table_the_verdict_and_the_facts_escaped(tmp_path):
    hostile = "<script>alert(1)</script>"
    decision = {"passed": False, "checks": [{"passed": True, "detail": "mean IoU 98.000 % ≥ 97 %"},
                                            {"passed": False, "detail": "cluster <tops> below 95 %"}]}
    champion = {"mean_iou": 0.97, "share_at_least": {"0.95": 0.5}, "clusters": {"tops & tees": {"mean_iou": 0.96}}}
    files = write_report(str(tmp_path), _summary(hostile), [0.97, 0.99], [], decision, champion,
                         facts={"dataset": "v1 <b>", "val IoU": "97.01 % for the starting weights"})
    page = (tmp_path / "report.html").read_text()
    assert set(files) == {"iou_histogram.png", "cluster_iou.png", "report.html"}
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Gate FAILED: promotion skipped" in page and "✗ cluster &lt;tops&gt; below 95 %" in page
    assert "<td>mean IoU</td><td>98.000 %</td><td>97.000 %</td>" in page
    assert "<td>images ≥ 99 % IoU</td><td>50.000 %</td><td>–</td>" in page  # the champion lacks the figure
    assert "<td>tops &amp; tees</td><td>2</td><td>98.000 %</td><td>96.000 %</td>" in page
    assert "dataset: <code>v1 &lt;b&gt;</code>" in page and page.count("data:image/png;base64,") == 2


def test_without_a_champion_or_a_decision_the_page_has_one_column_and_no_verdict(tmp_path):
    write_report(str(tmp_path), _summary("sku-1"), [0.97, 0.99], [])
    page = (tmp_path / "report.html").read_text()
    assert "champion" not in page and "Gate" not in page
    assert "<td>sku-1</td><td>tops &amp; tees</td><td>97.000 %</td>" in page
