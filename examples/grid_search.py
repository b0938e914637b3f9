"""Grid search over the number of heads and the activation, as for any scikit-learn model.

TGEMClassifier is a scikit-learn estimator, so it goes into a Pipeline and GridSearchCV.
To keep the search to a couple of minutes on a laptop CPU, the pipeline first keeps the
200 genes that separate the cell types best (an ANOVA F-test, refitted inside each fold),
and each model trains for 10 epochs.

    python examples/grid_search.py

Results go to ./tgem_examples_output/grid_search/.
"""

from pathlib import Path

import pandas as pd
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline

from tgem import TGEMClassifier
from tgem.datasets import load_pbmc68k

out = Path("tgem_examples_output") / "grid_search"
out.mkdir(parents=True, exist_ok=True)

X, y = load_pbmc68k(return_X_y=True, as_frame=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)

pipeline = Pipeline(
    [
        ("genes", SelectKBest(f_classif, k=200)),
        ("tgem", TGEMClassifier(max_epochs=10, random_state=0)),
    ]
)
grid = {
    "tgem__n_heads": [2, 5],
    "tgem__activation": ["leakyrelu", None],  # None: no activation before the output layer
}
search = GridSearchCV(
    pipeline,
    grid,
    cv=StratifiedKFold(3, shuffle=True, random_state=0),
    scoring="accuracy",
    n_jobs=1,
)
search.fit(X_train, y_train)

results = pd.DataFrame(search.cv_results_)[
    [
        "param_tgem__n_heads",
        "param_tgem__activation",
        "mean_test_score",
        "std_test_score",
        "mean_fit_time",
    ]
].sort_values("mean_test_score", ascending=False)
print(results.to_string(index=False))
results.to_csv(out / "cv_results.csv", index=False)

print(f"best: {search.best_params_}, cross-validated accuracy {search.best_score_:.3f}")
print(f"held-out accuracy of the refitted best pipeline: {search.score(X_test, y_test):.3f}")
