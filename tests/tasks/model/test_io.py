"""Loading a model folder: what is not a model says so."""

import pytest

from tasks.model.io import load_model


def test_a_folder_without_model_pt_or_a_missing_file_is_no_model(tmp_path):
    (tmp_path / "run").mkdir()
    for url in (tmp_path / "run", tmp_path / "nowhere" / "model.pt"):
        with pytest.raises(FileNotFoundError, match="no model at .*: pass a model.pt written by training"):
            load_model(str(url))
