"""The manifest's table helpers: ``conform`` gives the frame ``to_frame`` gives for the same rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.core.manifest import MANIFEST_COLUMNS, conform, to_frame


def _mixed_frame() -> pd.DataFrame:
    """Rows as shard results and a re-read manifest hold them: ints as floats with NaN, pandas NA,
    a column the frame lacks (``cluster``), one it has beyond the manifest's, a shuffled index."""
    frame = pd.DataFrame({
        "stem": ["b", "a", "c"],
        "status": pd.array(["ok", "quarantined", pd.NA], dtype="string"),
        "orig_width": [640.0, np.nan, 800.0],
        "height": pd.array([320, pd.NA, 240], dtype="Int64"),
        "fg_fraction": [0.25, None, 0.5],
        "audit_reasons": [None, "speckled", ""],
        "detail": [None, 3, "x"],
        "unrelated": [1, 2, 3],
    }, index=[7, 3, 5])
    return frame


def test_conform_equals_to_frame_of_the_frames_records() -> None:
    frame = _mixed_frame()
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    expected = to_frame(records, MANIFEST_COLUMNS)
    got = conform(frame, MANIFEST_COLUMNS)
    pd.testing.assert_frame_equal(got, expected)
    assert list(got.columns) == list(MANIFEST_COLUMNS) and list(got.index) == [0, 1, 2]
    assert got["cluster"].isna().all() and got.loc[1, "detail"] == "3"
    assert str(got["orig_width"].dtype) == "Int64" and str(got["fg_fraction"].dtype) == "Float64"


def test_conform_of_an_empty_frame_has_every_column() -> None:
    got = conform(_mixed_frame().iloc[:0], MANIFEST_COLUMNS)
    pd.testing.assert_frame_equal(got, to_frame([], MANIFEST_COLUMNS))


def test_conform_writes_numbers_in_a_text_column_as_held_and_refuses_duplicate_columns() -> None:
    frame = pd.DataFrame({"stem": pd.Series([1, None], dtype=object), "status": ["ok", "ok"]})
    assert conform(frame, MANIFEST_COLUMNS)["stem"].tolist() == ["1", pd.NA]
    with pytest.raises(ValueError, match="duplicate columns: \\['stem'\\]"):
        conform(pd.DataFrame([[1, 2]], columns=["stem", "stem"]), MANIFEST_COLUMNS)
