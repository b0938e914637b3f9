"""Model files and checkpoints against hostile or unusual files (issue 24, items 8, 9 and 10).

What ``tgem.load`` must refuse before reading or allocating (non-regular files, oversized files
and headers, declared dtypes and shapes the bytes do not hold), the atomic writer's temporary
files and concurrent saves, half-precision files, parameters checked against the constructor's
constraints, and files written by tgem 0.1.0 that must still load.
"""

import pickle
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from tgem import TGEMClassifier, load

COMPAT = Path(__file__).parent / "fixtures" / "compat_0.1"


# ------------------------------------------------------------------ files written by tgem 0.1.0
def _compat_expected():
    with np.load(COMPAT / "expected.npz", allow_pickle=False) as d:
        return d["X"], d["proba"], d["classes"]


@pytest.mark.parametrize("kind", ["tgem", "pickle", "joblib"])
def test_files_written_by_tgem_0_1_still_load_and_predict_the_same(kind):
    X, proba, classes = _compat_expected()
    if kind == "tgem":
        model = load(COMPAT / "model.tgem")
    elif kind == "pickle":
        with open(COMPAT / "model.pkl", "rb") as fh:
            model = pickle.load(fh)  # tgem's own committed test file
    else:
        model = joblib.load(COMPAT / "model.joblib")
    assert isinstance(model, TGEMClassifier)
    assert list(model.classes_) == list(classes)
    assert list(model.feature_names_in_) == ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14"]
    frame = pd.DataFrame(X, columns=model.feature_names_in_)
    np.testing.assert_allclose(model.predict_proba(frame), proba, rtol=0, atol=1e-6)
