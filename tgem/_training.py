"""The training loop: mini-batches, validation, early stopping, best weights, history.

Kept apart from the estimator so the loop can be read on one screen. Everything random comes
from the generators passed in; torch's global generator is never touched.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tgem._distributed import local_epoch
from tgem._runtime import (  # noqa: F401 - iter_batches: its old import path
    OOM_ERRORS,
    dense_batch,
    iter_batches,
    oom_safe_batches,
    release_cuda_memory,
)
from tgem.exceptions import TrainingDivergedError

logger = logging.getLogger(__name__)


def _accumulate_gradients(module, xb, yb, wb, n_chunks: int):
    """Forward and backward over ``xb`` in ``n_chunks`` parts; the batch loss and log-probas.

    Each part's loss is ``sum(nll * w) / sum(w of the whole batch)``, so the parts' gradients
    add up to the whole batch's gradient (up to rounding).
    """
    # a batch of zero weights (allowed: weight 0 leaves a sample out) has a zero loss, not 0/0
    total_w = wb.sum().clamp_min(torch.finfo(wb.dtype).tiny)
    loss, outs = 0.0, []
    for rows in iter_batches(xb.shape[0], -(-xb.shape[0] // n_chunks)):
        log_proba = module(xb[rows])
        nll = -log_proba.gather(1, yb[rows, None])[:, 0]
        part = (nll * wb[rows]).sum() / total_w
        part.backward()
        loss = loss + part.detach()
        outs.append(log_proba.detach())
    return loss, torch.cat(outs)


@dataclass
class TrainState:
    """What the loop leaves behind, also when it stops early or fails."""

    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None
    best_epoch: int | None = None
    best_loss: float = math.inf
    stopped: str = "max_epochs"


def _snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _weights_are_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in module.state_dict().values())


def _weighted_nll(log_proba, target, weight):
    nll = -log_proba.gather(1, target[:, None])[:, 0]
    return (nll * weight).sum() / weight.sum()


@torch.no_grad()
def evaluate(module, X, y, w, device, batch_size: int) -> tuple[float, float]:
    """Weighted mean NLL and accuracy of ``module`` on (X, y, w) in eval mode."""
    was_training = module.training
    module.eval()
    total, wsum, correct = 0.0, 0.0, 0

    def run(sl):
        nonlocal total, wsum, correct
        xb = dense_batch(X, sl, device)
        yb = torch.as_tensor(y[sl], device=device)
        wb = torch.as_tensor(w[sl], device=device)
        lp = module(xb)
        total += float(_weighted_nll(lp, yb, wb) * wb.sum())
        wsum += float(wb.sum())
        correct += int((lp.argmax(1) == yb).sum())

    oom_safe_batches(
        X.shape[0], batch_size, run, device=device, n_genes=X.shape[1], what="evaluating"
    )
    module.train(was_training)
    return total / max(wsum, 1e-300), correct / max(1, X.shape[0])


def make_optimizer(params, learning_rate: float, weight_decay: float = 0.0):
    """The training loop's Adam, fused (one kernel for all parameters) where PyTorch has it.

    PyTorch's fused Adam runs on CPU (PyTorch 2.4 and later) and CUDA floating-point tensors;
    it computes the same update as the default implementation (to rounding) in one call
    instead of several operator calls per parameter (about 2 ms less per step for the
    published model on two CPU cores). Elsewhere (other devices, older PyTorch) the default
    implementation is used.

    Examples
    --------
    >>> import torch
    >>> make_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3).defaults["lr"]
    0.001
    """
    params = list(params)
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    if fused:
        try:
            return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError) as exc:  # e.g. no fused CPU Adam before PyTorch 2.4
            logger.debug("fused Adam unavailable (%s); using the default implementation", exc)
    return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)


def train(
    module: torch.nn.Module,
    X,
    y: np.ndarray,
    w: np.ndarray,
    *,
    valid=None,
    device: torch.device,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    n_iter_no_change: int | None,
    shuffle_generator: torch.Generator,
    verbose: int = 0,
    state: TrainState | None = None,
    on_improvement: Callable[[TrainState], None] | None = None,
    dist=None,
) -> TrainState:
    """Train ``module`` in place with Adam on the weighted NLL.

    Parameters
    ----------
    X, y, w
        Training data (dense array or scipy sparse), encoded labels and per-sample weights.
    valid : tuple (X, y, w), optional
        Validation data; when given, the epoch with the lowest validation loss is the best
        one and ``n_iter_no_change`` epochs without improvement stop training.
    state : TrainState, optional
        Continue a previous state (``warm_start``): history and best loss carry over.
    on_improvement : callable, optional
        Called with the state each time a new best epoch is found (checkpointing).
    dist : tgem._distributed.DistContext, optional
        Data-parallel training: the module runs in DistributedDataParallel, each process
        takes its share of every epoch and only rank 0 logs and calls ``on_improvement``.

    Returns
    -------
    TrainState
        The module holds the best weights (with validation) or the last epoch's weights
        (without). A non-finite loss, or weights made non-finite by an epoch's last step
        (whose loss is never measured), raises :class:`TrainingDivergedError` after
        restoring the best weights so far (the weights the fit started from when no epoch
        finished); no snapshot or ``on_improvement`` call ever sees non-finite weights.
        ``KeyboardInterrupt`` is re-raised the same way and the state's ``stopped`` says so.
    """
    state = state or TrainState()
    # what a divergence before the first finished epoch falls back to (one copy per fit)
    start_state = _snapshot(module) if state.best_state is None else None
    optimizer = make_optimizer(module.parameters(), learning_rate, weight_decay)
    n = X.shape[0]
    y_t = torch.as_tensor(y)
    w_t = torch.as_tensor(w, dtype=torch.float32)
    no_change, n_chunks = 0, 1
    first_epoch = len(state.history) + 1
    bar = None
    is_main = dist is None or dist.is_main
    net = module if dist is None else dist.wrap(module)
    if verbose and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_epochs, desc="tgem fit", unit="epoch", leave=verbose > 1)
    try:
        for epoch in range(first_epoch, first_epoch + max_epochs):
            t0 = time.perf_counter()
            module.train()
            steps = (
                local_epoch(X, n, batch_size, shuffle_generator)
                if dist is None
                else dist.epoch(X, n, w_t, batch_size, shuffle_generator)
            )
            loss_sum, weight_sum, correct, b = 0.0, 0.0, 0, 0
            for b, (idx, source, step) in enumerate(steps, start=1):
                xb = dense_batch(source, idx, device)
                yb = y_t[idx].to(device)
                wb = w_t[idx].to(device) if step is None else step.weights
                while True:  # on OOM, accumulate the gradient over smaller parts of the batch
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        loss, log_proba = (
                            _accumulate_gradients(module, xb, yb, wb, n_chunks)
                            if step is None
                            else step.accumulate(net, xb, yb, wb, n_chunks)
                        )
                        break
                    except OOM_ERRORS as exc:
                        if n_chunks >= len(idx):
                            raise MemoryError(
                                f"{device} ran out of memory training on a single sample of "
                                f"{xb.shape[1]} genes (batches of {len(idx)} were split into "
                                f"{n_chunks} parts) at epoch {epoch}, batch {b}. Free device "
                                "memory, use fewer heads or genes, or device='cpu'."
                            ) from exc
                    n_chunks = min(2 * n_chunks, len(idx))
                    logger.warning(
                        "%s ran out of memory at epoch %d, batch %d; accumulating "
                        "gradients over %d parts.",
                        device,
                        epoch,
                        b,
                        n_chunks,
                    )
                    release_cuda_memory(device)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"The training loss became {float(loss)} at epoch {epoch}, batch {b}. "
                        f"{_kept(state)} Try a lower learning_rate (now {learning_rate:g}) or "
                        "check X and the sample weights for extreme values."
                    )
                if step is not None or bool(wb.any()):  # no step for a batch of zero weight
                    optimizer.step()
                batch_w, batch_correct = (
                    (wb.sum(), (log_proba.argmax(1) == yb).sum())
                    if step is None
                    else (step.weight_sum, step.correct)
                )
                loss_sum += float(loss.detach()) * float(batch_w)
                weight_sum += float(batch_w)
                correct += int(batch_correct)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_sum / weight_sum:.4f}")
            if not _weights_are_finite(module):  # the last step's loss is never measured
                raise TrainingDivergedError(
                    f"The weights became non-finite in the last optimizer step of epoch "
                    f"{epoch} (batch {b}). {_kept(state)} Try a lower learning_rate (now "
                    f"{learning_rate:g}) or check X for extreme values."
                )
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / weight_sum,
                "train_accuracy": correct / n,
                "valid_loss": float("nan"),
                "valid_accuracy": float("nan"),
            }
            if valid is not None:
                record["valid_loss"], record["valid_accuracy"] = evaluate(
                    module, *valid, device=device, batch_size=max(batch_size, 256)
                )
                if dist is not None:  # rank 0 decides, so early stopping stops all together
                    record["valid_loss"], record["valid_accuracy"] = dist.broadcast(
                        [record["valid_loss"], record["valid_accuracy"]]
                    ).tolist()
            record["duration_s"] = time.perf_counter() - t0
            state.history.append(record)
            monitored = record["valid_loss"] if valid is not None else record["train_loss"]
            if monitored < state.best_loss:
                state.best_loss, state.best_epoch = monitored, epoch
                state.best_state = _snapshot(module)
                no_change = 0
                if on_improvement is not None and is_main:
                    on_improvement(state)
            else:
                no_change += 1
            if is_main:
                logger.info("epoch %d: %s", epoch, {k: round(v, 5) for k, v in record.items()})
            if bar is not None:
                bar.update(1)
            if valid is not None and n_iter_no_change is not None and no_change >= n_iter_no_change:
                state.stopped = "early_stopping"
                break
    except (TrainingDivergedError, KeyboardInterrupt, MemoryError) as exc:
        state.stopped = (
            "diverged"
            if isinstance(exc, TrainingDivergedError)
            else "out_of_memory"
            if isinstance(exc, MemoryError)
            else "interrupted"
        )
        if state.best_state is not None:
            module.load_state_dict(state.best_state)
        elif start_state is not None and isinstance(exc, TrainingDivergedError):
            module.load_state_dict(start_state)
        raise
    finally:
        if bar is not None:
            bar.close()
        if net is not module:
            # DistributedDataParallel sits in reference cycles (its hooks); left to the
            # interpreter's final collection, its process group's worker threads can still be
            # releasing a collective's tensors then, and abort the process (SIGABRT).
            del net
            gc.collect()
    if valid is not None and state.best_state is not None:
        module.load_state_dict(state.best_state)
    return state


def _kept(state: TrainState) -> str:
    """What the model holds after a divergence, for the error message."""
    if state.best_state is None:
        return "The model keeps the weights this fit started from (no epoch of it finished)."
    return f"The model keeps the best weights so far (epoch {state.best_epoch})."
