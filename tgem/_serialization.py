"""What pickles and model files share: the network as plain arrays, and where it loads.

``TGEMClassifier.__getstate__`` / ``__setstate__`` (pickle, joblib, skops, cloudpickle) and
the pickle-free model file (:mod:`tgem._io`) both store the network as its constructor
arguments (:func:`tgem._model.module_init`) and one NumPy array per ``state_dict`` entry, keep
the training state without its weight snapshot, and move a network fitted on a GPU to the
CPU, with a :class:`~tgem.exceptions.DeviceWarning`, where that GPU does not exist. Both use
these helpers, so the two formats cannot drift apart.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from tgem._model import TGEMNet, module_init
from tgem._training import TrainState
from tgem.exceptions import DeviceWarning

__all__ = [
    "build_module",
    "loadable_device",
    "module_init",
    "state_arrays",
    "to_numpy",
    "without_snapshot",
]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A weight as a NumPy array; bfloat16, which NumPy cannot hold, becomes float32 (exact)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def state_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The network's ``state_dict`` as NumPy arrays (no torch needed to read them back).

    Examples
    --------
    >>> net = TGEMNet(n_genes=4, n_classes=2, n_heads=2)
    >>> arrays = state_arrays(net)
    >>> type(arrays["classifier.weight"]).__name__, arrays["classifier.weight"].shape
    ('ndarray', (2, 4))
    """
    return {key: to_numpy(value) for key, value in module.state_dict().items()}


def build_module(init: dict, arrays: dict, *, seed: int | None = None, dtype=None) -> TGEMNet:
    """The network of ``module_init`` arguments ``init`` holding the weights ``arrays``.

    The global random generator is never touched: the construction's draws (overwritten by
    the weights) come from a local generator, seeded with ``seed`` when given. With
    ``dtype`` the network is cast to it before the weights are loaded (model files keep the
    saved precision); without it, the weights are copied into the float32 network (pickles,
    as in tgem 0.1). The network is returned in eval mode, on the CPU.

    Examples
    --------
    >>> net = TGEMNet(n_genes=4, n_classes=2, n_heads=2)
    >>> again = build_module(module_init(net), state_arrays(net))
    >>> bool(torch.equal(again.classifier.weight, net.classifier.weight))
    True
    """
    generator = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    module = TGEMNet(**init, generator=generator)
    if dtype is not None:
        module.to(dtype)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    else:
        module.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    return module.eval()


def without_snapshot(state: TrainState) -> TrainState:
    """The training state without its copy of the best weights (the network holds them)."""
    return TrainState(
        history=state.history,
        best_state=None,
        best_epoch=state.best_epoch,
        best_loss=state.best_loss,
        stopped=state.stopped,
    )


def loadable_device(saved: torch.device, what: str, stacklevel: int = 2) -> torch.device:
    """Where a network fitted on ``saved`` can run here.

    A CUDA device that does not exist here becomes the CPU, with a
    :class:`~tgem.exceptions.DeviceWarning` naming ``what`` ("This model", a file name); a
    CUDA index beyond the GPUs present becomes the current GPU; another device type the CPU.

    Examples
    --------
    >>> str(loadable_device(torch.device("cpu"), "This model"))
    'cpu'
    """
    if saved.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"{what} was fitted on {saved}, which is not available here; it is loaded on the CPU.",
            DeviceWarning,
            stacklevel=stacklevel + 1,
        )
        return torch.device("cpu")
    if saved.type == "cuda" and (saved.index or 0) >= torch.cuda.device_count():
        return torch.device("cuda")
    if saved.type not in ("cpu", "cuda"):
        return torch.device("cpu")
    return saved
