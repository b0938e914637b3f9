from dask.distributed import Client, LocalCluster

from tgem import TGEMClassifier
from tgem import dask as tdask

if __name__ == "__main__":
    clf = TGEMClassifier(n_layers=1, max_epochs=3, learning_rate=1e-3, random_state=0)
    clf.fit("pbmc.h5ad", y="cell_type")  # written by the recipe above
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster):
        X = tdask.from_h5ad("pbmc.h5ad", chunk_rows=200)  # lazy; each task opens the file
        proba = tdask.predict_proba(clf, X)  # the model is scattered once
        attributions = tdask.attribute(clf, X[:100], target="predicted")
        print(proba.compute().shape, attributions.compute().shape)
