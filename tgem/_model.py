"""The T-GEM network as a plain ``torch.nn.Module`` (no numpy, no scikit-learn).

Each gene is a token holding one number. A layer gives every head per-gene scalar weights
``WQ, WK, WV`` (shape ``(heads, genes, 1)``, as in the original), applies the exact T-GEM
attention (softmax over keys, the gene's own weight zeroed after the softmax) and mixes the
heads with ``W_0``. The block is ``x + LayerNorm(dropout(attention(x)))``; by default one
LayerNorm is shared by all layers, as in the original. With ``standardize=True`` the network
first maps its input to ``(x - input_mean) / input_scale`` with per-gene buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tgem._kernels import Backend, check_tolerance, resolve_backend

ACTIVATIONS = ("relu", "leakyrelu", "gelu")


class TGEMLayerNorm(nn.Module):
    """The original's LayerNorm: ``a * (x - mean) / (std + eps) + b`` with the unbiased std.

    With a single gene the unbiased std is undefined (the original gives NaN); the biased
    std (0) is used instead so the layer returns ``b``.
    """

    def __init__(self, n_genes: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_genes))
        self.bias = nn.Parameter(torch.zeros(n_genes))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True, correction=1 if x.shape[-1] > 1 else 0)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


class Dropout(nn.Module):
    """Dropout drawing its mask from ``self.generator`` (a ``torch.Generator`` or None).

    The training loop sets the generator so fits are repeatable under ``random_state``
    without reseeding torch's global generator.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        keep = 1.0 - self.p
        mask = torch.empty_like(x).bernoulli_(keep, generator=self.generator)
        return x * mask / keep


class GeneAttention(nn.Module):
    """One T-GEM multi-head attention over scalar gene tokens."""

    def __init__(self, n_genes: int, n_heads: int):
        super().__init__()
        self.WQ = nn.Parameter(torch.empty(n_heads, n_genes, 1))
        self.WK = nn.Parameter(torch.empty(n_heads, n_genes, 1))
        self.WV = nn.Parameter(torch.empty(n_heads, n_genes, 1))
        self.W_0 = nn.Parameter(torch.full((n_heads,), 0.001))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of all heads, each of shape (batch, heads, genes)."""
        xb = x.unsqueeze(1)
        return xb * self.WQ[..., 0], xb * self.WK[..., 0], xb * self.WV[..., 0]

    def mix(self, heads_out: torch.Tensor) -> torch.Tensor:
        """Mix (batch, heads, genes) head outputs into (batch, genes) with ``W_0``."""
        return torch.einsum("bhg,h->bg", heads_out, self.W_0)

    def forward(self, x: torch.Tensor, backend: Backend) -> torch.Tensor:
        """Mixed attention output (batch, genes) of input ``x`` (batch, genes)."""
        if backend.layer_fn is not None:
            return backend.layer_fn(x, self.WQ, self.WK, self.WV, self.W_0)
        q, k, v = self.qkv(x)
        return self.mix(backend.fn(q, k, v))


class TGEMNet(nn.Module):
    """The T-GEM network: ``n_layers`` attention blocks, activation, linear head, log-softmax.

    Parameters
    ----------
    n_genes, n_classes : int
        Input tokens and output classes.
    n_layers, n_heads : int
        Depth and heads per layer.
    activation : {"relu", "leakyrelu", "gelu"} or None
        Applied after the last block (leaky ReLU has slope 0.1, as in the original).
    dropout : float
        Dropout on each attention output, before the LayerNorm.
    shared_norm : bool
        One LayerNorm for all layers (the original) or one per layer.
    attention_backend : str
        Name understood by :func:`tgem._kernels.resolve_backend`; resolved for the input's
        device and dtype and the network's gene count at each call (cheap; ``"auto"`` may
        choose per attention call, see :func:`~tgem._kernels.resolve_backend`).
    generator : torch.Generator, optional
        Draws the initial weights (Xavier-normal for WQ/WK/WV as (heads, genes, 1) tensors,
        Xavier-uniform for the linear head).
    qk_init_scale : float, default=1.0
        Factor applied to the initial WQ and WK (not WV), after the same random draws.
    standardize : bool, default=False
        Register the per-gene buffers ``input_mean`` (zeros) and ``input_scale`` (ones) and
        apply ``(x - input_mean) / input_scale`` as the first operation of ``forward`` (set
        them with :meth:`set_standardization`). Without it the input goes in unchanged and
        the module has no such buffers (as in tgem 0.1).
    tree_tolerance : float or None, default=None
        Error tolerance of the attention backends that take one (the tree code), within
        :data:`tgem._kernels.TOL_RANGE`; None takes their default for the input's dtype.

    Examples
    --------
    >>> import torch
    >>> net = TGEMNet(n_genes=6, n_classes=3, generator=torch.Generator().manual_seed(0))
    >>> log_proba = net(torch.randn(4, 6))
    >>> log_proba.shape
    torch.Size([4, 3])
    >>> torch.allclose(log_proba.exp().sum(1), torch.ones(4))
    True
    """

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        n_layers: int = 3,
        n_heads: int = 5,
        activation: str | None = "leakyrelu",
        dropout: float = 0.3,
        shared_norm: bool = True,
        attention_backend: str = "auto",
        generator: torch.Generator | None = None,
        qk_init_scale: float = 1.0,
        standardize: bool = False,
        tree_tolerance: float | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS + (None,):
            raise ValueError(f"activation={activation!r}; choose one of {ACTIVATIONS} or None")
        self.n_genes, self.n_classes = n_genes, n_classes
        self.activation = activation
        self.attention_backend = attention_backend
        self.tree_tolerance = check_tolerance(tree_tolerance)
        self.layers = nn.ModuleList(GeneAttention(n_genes, n_heads) for _ in range(n_layers))
        self.norms = nn.ModuleList(
            TGEMLayerNorm(n_genes) for _ in range(1 if shared_norm else n_layers)
        )
        self.dropout = Dropout(dropout)
        self.standardize = bool(standardize)
        if self.standardize:
            self.register_buffer("input_mean", torch.zeros(n_genes))
            self.register_buffer("input_scale", torch.ones(n_genes))
        # no default initialisation: it would draw from torch's global generator
        self.classifier = nn.utils.skip_init(
            nn.Linear, n_genes, n_classes, device=torch.empty(()).device
        )
        self.reset_parameters(generator, qk_init_scale=qk_init_scale)

    @torch.no_grad()
    def reset_parameters(
        self, generator: torch.Generator | None = None, qk_init_scale: float = 1.0
    ) -> None:
        """Initialise the weights as the original does, drawing from ``generator``.

        ``qk_init_scale`` multiplies the initial WQ and WK after the draws (1 leaves them as
        drawn, bit for bit; 0 gives uniform attention, whose query and key gradients are 0).
        """
        for layer in self.layers:
            h, g, _ = layer.WQ.shape
            std = math.sqrt(2.0 / (g + h))  # xavier_normal_ on a (heads, genes, 1) tensor
            for w in (layer.WQ, layer.WK, layer.WV):
                w.copy_(torch.randn(w.shape, generator=generator) * std)
            if qk_init_scale != 1.0:
                layer.WQ.mul_(qk_init_scale)
                layer.WK.mul_(qk_init_scale)
            layer.W_0.fill_(0.001)
        fan_out, fan_in = self.classifier.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform_
        self.classifier.weight.copy_(
            (torch.rand(self.classifier.weight.shape, generator=generator) * 2 - 1) * bound
        )
        b = 1.0 / math.sqrt(fan_in)  # nn.Linear's default bias initialisation
        self.classifier.bias.copy_((torch.rand(fan_out, generator=generator) * 2 - 1) * b)
        for norm in self.norms:
            norm.weight.fill_(1.0)
            norm.bias.fill_(0.0)

    @torch.no_grad()
    def set_standardization(self, mean, scale) -> None:
        """Set the per-gene ``input_mean`` and ``input_scale`` (``standardize=True`` only)."""
        if not self.standardize:
            raise ValueError(
                "this network was built with standardize=False and has no input statistics; "
                "build it with TGEMNet(..., standardize=True)."
            )
        for buffer, values in ((self.input_mean, mean), (self.input_scale, scale)):
            values = torch.as_tensor(values, dtype=torch.float64)
            if values.shape != buffer.shape:
                raise ValueError(
                    f"input statistics of shape {tuple(values.shape)}; expected "
                    f"{tuple(buffer.shape)} (one value per gene)."
                )
            buffer.copy_(values.to(buffer.dtype))

    def standardize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - input_mean) / input_scale`` with ``standardize=True``; ``x`` otherwise."""
        if not self.standardize:
            return x
        return (x - self.input_mean) / self.input_scale

    def norm(self, index: int) -> TGEMLayerNorm:
        """The LayerNorm used by layer ``index``."""
        return self.norms[index if len(self.norms) > 1 else 0]

    def backend(self, x: torch.Tensor) -> Backend:
        """The attention backend used for input ``x`` (its device and dtype), with the
        network's gene count and ``tree_tolerance``."""
        return resolve_backend(
            self.attention_backend,
            x.device,
            x.dtype,
            genes=self.n_genes,
            tol=getattr(self, "tree_tolerance", None),
        )

    def block(self, index: int, x: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
        """Residual block of layer ``index`` given its (batch, heads, genes) attention output."""
        return self.residual(index, x, self.layers[index].mix(heads_out))

    def residual(self, index: int, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """``x + LayerNorm(dropout(mixed))`` for layer ``index``'s mixed attention output."""
        return x + self.norm(index)(self.dropout(mixed))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Activation, linear layer and log-softmax applied to the last block's output."""
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "leakyrelu":
            h = F.leaky_relu(h, 0.1)
        elif self.activation == "gelu":
            h = F.gelu(h)
        return F.log_softmax(self.classifier(h), dim=-1)

    def forward(self, x: torch.Tensor, return_layers: bool = False):
        """Log-probabilities of shape (batch, classes) for ``x`` of shape (batch, genes).

        With ``return_layers`` also returns the list of each layer's input followed by the
        last layer's output (``n_layers + 1`` tensors of shape (batch, genes)); the first
        layer's input is the standardised ``x`` when ``standardize`` is on.
        """
        x = self.standardize_input(x)
        backend = self.backend(x)
        states = [x]
        h = x
        for i, layer in enumerate(self.layers):
            h = self.residual(i, h, layer(h, backend))
            states.append(h)
        out = self.head(h)
        return (out, states) if return_layers else out


def module_init(module: TGEMNet) -> dict:
    """The keyword arguments that rebuild ``module``'s architecture (for pickles and model files).

    Examples
    --------
    >>> net = TGEMNet(n_genes=4, n_classes=2, n_heads=2)
    >>> module_init(net)["n_heads"]
    2
    """
    layer = module.layers[0]
    return (
        dict(
            n_genes=module.n_genes,
            n_classes=module.n_classes,
            n_layers=len(module.layers),
            n_heads=layer.WQ.shape[0],
            activation=module.activation,
            dropout=module.dropout.p,
            shared_norm=len(module.norms) == 1 or len(module.layers) == 1,
            attention_backend=module.attention_backend,
        )
        | ({"standardize": True} if module.standardize else {})
        | _tolerance_init(module)
    )


def _tolerance_init(module: TGEMNet) -> dict:
    """``tree_tolerance`` when set: networks with the default keep the older arguments."""
    tol = getattr(module, "tree_tolerance", None)
    return {} if tol is None else {"tree_tolerance": tol}
