import torch.distributed as dist

from tgem import TGEMClassifier
from tgem.datasets import load_pbmc68k

X, y = load_pbmc68k(return_X_y=True)
clf = TGEMClassifier(
    n_layers=1,
    batch_size=16,  # 16 per process: 32 per step with 2
    max_epochs=3,
    learning_rate=1e-3,
    n_threads=1,
    random_state=0,
)
clf.fit(X, y, checkpoint="pbmc_ddp.tgem")  # only rank 0 writes the checkpoint
if dist.get_rank() == 0:  # every rank holds the same weights
    print(f"world size {dist.get_world_size()}, training accuracy {clf.score(X, y):.3f}")
dist.destroy_process_group()
