"""Data-parallel training with ``torch.distributed``: the process group, the epoch plan, the loss.

The training loop (:func:`tgem._training.train`) asks this module for each epoch's batches.
Without a process group it gets :func:`local_epoch`: one shuffle of all rows (or the
chunk-shuffled order of an out-of-core dataset) cut into consecutive batches.

Under ``torchrun`` or inside an initialised process group it gets
:meth:`DistContext.epoch`. Every process draws the *same* epoch order from the same shuffle
generator (the seeds are broadcast from rank 0) and takes a disjoint share of it:

* in-memory data are shared row by row (``order[rank::world_size]``), so step ``k`` of all
  processes together covers exactly the rows ``order[k*B*W:(k+1)*B*W]``, the batch a single
  process with ``batch_size = B*W`` would take;
* out-of-core data (:class:`tgem._h5ad.H5ADDataset`) are shared by read units (groups of
  contiguous chunks), so each process reads only its own rows from disk and every row is
  read once per epoch.

Each process's loss is ``sum_local(w * nll) * W / sum_global(w)``. DistributedDataParallel
averages the gradients over the ``W`` processes, so the applied gradient is that of the
weighted mean NLL over the *global* batch, exactly as in one process. Processes whose share
runs out before the others' take zero-weight steps so that all make the same number of
optimizer steps (DDP needs every process in every gradient reduction).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether the environment holds a ``torchrun``/``torch.distributed.launch`` rendezvous."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def epoch_order(X, n: int, generator: torch.Generator):
    """One epoch's row order, its read units and the object to read the rows from.

    Returns ``(order, bounds, source)``: ``order`` is a permutation of ``range(n)``;
    ``bounds`` is None (any row is as cheap to read as any other) or the start positions of
    the read units in ``order`` followed by ``n``; ``source`` is indexed with rows of
    ``order``. In-memory data are shuffled with ``torch.randperm(n, generator=generator)``,
    datasets with an ``epoch_order`` method (out-of-core) choose their own order.
    """
    if hasattr(X, "epoch_order"):
        return X.epoch_order(generator)
    return torch.randperm(n, generator=generator).numpy(), None, X


def local_epoch(X, n: int, batch_size: int, generator: torch.Generator) -> Iterator:
    """Batches of a single-process epoch: ``(rows, source, None)`` per step."""
    order, _, source = epoch_order(X, n, generator)
    for start in range(0, n, batch_size):
        yield order[start : min(n, start + batch_size)], source, None


def shares(order: np.ndarray, bounds: np.ndarray | None, world_size: int) -> list[np.ndarray]:
    """Split an epoch order between ``world_size`` processes (disjoint, covering all rows).

    Without ``bounds`` rows are dealt one by one (``order[r::world_size]``); with read-unit
    ``bounds`` whole units are dealt round-robin, so each process reads only its own units.

    Examples
    --------
    >>> [s.tolist() for s in shares(np.arange(5), None, 2)]
    [[0, 2, 4], [1, 3]]
    >>> [s.tolist() for s in shares(np.arange(6), np.array([0, 2, 4, 6]), 2)]
    [[0, 1, 4, 5], [2, 3]]
    """
    if bounds is None:
        return [order[r::world_size] for r in range(world_size)]
    n_units = len(bounds) - 1
    out = []
    for r in range(world_size):
        parts = [order[bounds[u] : bounds[u + 1]] for u in range(r, n_units, world_size)]
        out.append(np.concatenate(parts) if parts else order[:0])
    return out


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel fit."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live (NCCL needs them on the GPU)."""
        import torch.distributed as tdist

        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (broadcasts rank 0's weights)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def broadcast(self, values) -> np.ndarray:
        """Rank 0's float64 ``values`` on every process."""
        import torch.distributed as tdist

        t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=self.comm_device)
        tdist.broadcast(t, src=0)
        return t.cpu().numpy()

    def leave_together(self) -> None:
        """Return only when every process has finished its collectives.

        gloo completes a broadcast on its source before the others have received it; a
        process that tears its process group down at once (``destroy_process_group`` right
        after ``fit``) can then abort the whole program with a message still in flight.
        """
        import torch.distributed as tdist

        tdist.barrier()

    def broadcast_seeds(self, seeds: np.ndarray) -> np.ndarray:
        """Rank 0's integer seeds on every process (so ``random_state=None`` agrees too)."""
        import torch.distributed as tdist

        t = torch.as_tensor(np.asarray(seeds, dtype=np.int64), device=self.comm_device)
        tdist.broadcast(t, src=0)
        return t.cpu().numpy()

    def epoch(
        self, X, n: int, w_t: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> Iterator:
        """This process's steps of one epoch: ``(rows, source, step)``.

        Every process computes every process's share (index arithmetic only), so the global
        weight sum of each step and the number of steps are known without communication.
        """
        order, bounds, source = epoch_order(X, n, generator)
        parts = shares(order, bounds, self.world_size)
        mine = parts[self.rank]
        n_steps = max(math.ceil(len(p) / batch_size) for p in parts)
        for k in range(n_steps):
            sl = slice(k * batch_size, (k + 1) * batch_size)
            step_rows = [p[sl] for p in parts]
            global_w = w_t[torch.as_tensor(np.concatenate(step_rows))].sum()
            rows = step_rows[self.rank]
            dummy = len(rows) == 0
            if dummy:  # this share ran out: a zero-weight step on a row already read
                rows = mine[-1:] if len(mine) else np.concatenate(step_rows)[:1]
                weights = torch.zeros(1, dtype=w_t.dtype)
            else:
                weights = w_t[torch.as_tensor(rows)]
            yield (
                rows,
                source,
                _Step(self, weights.to(self.device), global_w.to(self.device), dummy),
            )


class _Step:
    """One data-parallel step: the local share of the global-batch loss and its statistics."""

    def __init__(
        self, ctx: DistContext, weights: torch.Tensor, global_w: torch.Tensor, dummy: bool = False
    ):
        self.ctx = ctx
        self.dummy = dummy
        self.weights = weights
        self.global_w = global_w
        self.mean_loss = torch.tensor(float("nan"))
        self.loss_sum = self.weight_sum = 0.0
        self.correct = 0

    def accumulate(
        self,
        net: torch.nn.Module,
        xb: torch.Tensor,
        yb: torch.Tensor,
        wb: torch.Tensor,
        n_chunks: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of this process's rows; ``(global mean loss, log-probas)``.

        The local loss ``sum_local(w * nll) / (sum_global(w) / W)`` is back-propagated in
        ``n_chunks`` parts (gradient accumulation after running out of memory; DDP
        synchronises on the last part only). DDP's gradient average over the ``W`` processes
        then gives the gradient of the weighted mean NLL over the global batch. The step's
        loss and correct predictions are all-reduced so every process logs the same figures.
        """
        import torch.distributed as tdist

        total_w = self.global_w / self.ctx.world_size
        n = xb.shape[0]
        size = -(-n // n_chunks)
        local, outs = torch.zeros((), dtype=torch.float64, device=xb.device), []
        for start in range(0, n, size):
            rows = slice(start, min(n, start + size))
            sync = rows.stop >= n
            with contextlib.nullcontext() if sync else net.no_sync():
                log_proba = net(xb[rows])
                weighted = (-log_proba.gather(1, yb[rows, None])[:, 0] * wb[rows]).sum()
                (weighted / total_w).backward()
            local = local + weighted.detach().double()
            outs.append(log_proba.detach())
        log_proba = torch.cat(outs)
        correct = (log_proba.argmax(1) == yb).sum().double() * (not self.dummy)
        stats = torch.stack([local, correct]).to(self.ctx.comm_device)
        tdist.all_reduce(stats)
        total, n_correct = stats.tolist()
        gw = float(self.global_w)
        self.loss_sum, self.weight_sum, self.correct = total, gw, int(n_correct)
        self.mean_loss = torch.tensor(total / gw if gw > 0 else float("nan"))
        return self.mean_loss, log_proba


def resolve_distributed(distributed, device: torch.device) -> DistContext | None:
    """The data-parallel context ``fit`` runs in, or None for an ordinary single-process fit.

    ``distributed="auto"`` uses an initialised process group, or initialises one (env://, gloo
    on CPU, NCCL on CUDA) when the process runs under ``torchrun`` with more than one process.
    ``True`` requires one of the two; ``False`` never distributes. A group of one process is
    an ordinary fit.
    """
    if distributed is False:
        return None
    import torch.distributed as tdist

    if not tdist.is_available():
        if distributed is True:
            raise ValueError(
                "distributed=True but this torch build has no torch.distributed support. "
                "Install a torch build with it or use distributed='auto'."
            )
        return None
    if not tdist.is_initialized():
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda" and device.index is None:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            logger.info(
                "initialising torch.distributed (%s) from the torchrun environment", backend
            )
            tdist.init_process_group(backend=backend)
        elif distributed is True:
            raise ValueError(
                "distributed=True but no torch.distributed process group is initialised and "
                "the process was not started by torchrun. Launch with `torchrun "
                "--nproc_per_node=N script.py`, call torch.distributed.init_process_group() "
                "before fit, or use distributed='auto'."
            )
        else:
            return None
    world_size = tdist.get_world_size()
    if world_size == 1:
        return None
    if tdist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the torch.distributed process group uses NCCL, which needs CUDA tensors, but "
            f"the device is {device}. Use device='cuda' (or 'auto' on a GPU machine) or a "
            "gloo process group."
        )
    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", tdist.get_rank() % torch.cuda.device_count()))
        device = torch.device("cuda", local)
    return DistContext(rank=tdist.get_rank(), world_size=world_size, device=device)
