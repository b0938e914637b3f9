import joblib
from dask.distributed import Client, LocalCluster
from sklearn.model_selection import GridSearchCV

from tgem import TGEMClassifier
from tgem.datasets import load_pbmc68k

if __name__ == "__main__":  # the workers are separate processes
    X, y = load_pbmc68k(return_X_y=True)
    clf = TGEMClassifier(
        n_layers=1, max_epochs=3, learning_rate=1e-3, n_threads=1, random_state=0
    )  # one torch thread per worker
    grid = {"n_heads": [1, 3], "activation": ["relu", "gelu"]}
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster):
        search = GridSearchCV(clf, grid, cv=3, n_jobs=-1)
        with joblib.parallel_config(backend="dask"):
            search.fit(X, y)
    print(search.best_params_, round(search.best_score_, 3))
