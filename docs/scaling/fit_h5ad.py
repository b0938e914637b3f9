import anndata
import pandas as pd
import scipy.sparse as sp

from tgem import TGEMClassifier
from tgem.datasets import load_pbmc68k

# an example .h5ad (sparse CSR X, cell types in obs) -- use your own atlas instead
X, y = load_pbmc68k(return_X_y=True, as_frame=True)
anndata.AnnData(
    X=sp.csr_matrix(X.to_numpy()),
    obs=pd.DataFrame({"cell_type": y.to_numpy()}, index=X.index),
    var=pd.DataFrame(index=X.columns),
).write_h5ad("pbmc.h5ad")

clf = TGEMClassifier(n_layers=1, max_epochs=8, learning_rate=1e-3, random_state=0)
clf.fit("pbmc.h5ad", y="cell_type")  # streamed from disk, never loaded whole
backed = anndata.read_h5ad("pbmc.h5ad", backed="r")  # a backed AnnData works the same
proba = clf.predict_proba(backed)
print(proba.shape, f"accuracy {clf.score('pbmc.h5ad', backed.obs['cell_type']):.3f}")
