"""Attention analysis of a fitted :class:`~tgem.TGEMClassifier`.

- :func:`attention_entropy` (tidy with :func:`entropy_table`): natural-log entropy of each
  head's attention rows, per layer and head (optionally per sample and per gene), never
  holding more than a block of the gene x gene matrix.
- :func:`attention_map`: one layer's (and head's) attention matrix for given samples, or its
  mean, streamed block by block, with a clear error when the result would not fit.
- :func:`layer_outputs`: each layer's output, usable as an embedding of the samples.
- :func:`attention_attribution`: the original's Layer Integrated Gradients on each layer's
  softmax attention map (baseline input 0), averaged over samples and summed over heads, in
  O(genes^2) memory per layer whatever the number of samples and steps.
- :func:`attention_network`, :func:`attention_edges`, :func:`hub_genes`, :func:`write_edges`,
  :func:`write_graphml`, :func:`to_networkx`: the gene-gene network and its hub genes, as
  tidy tables, Cytoscape-ready TSV, GraphML and ``networkx`` graphs.

All functions read a fitted classifier and never modify it or the user's arrays.
"""

from __future__ import annotations

from tgem.attention._attribution import attention_attribution, attention_network
from tgem.attention._entropy import attention_entropy, entropy_table
from tgem.attention._maps import attention_map, layer_outputs
from tgem.attention._network import (
    attention_edges,
    hub_genes,
    to_networkx,
    write_edges,
    write_graphml,
)

__all__ = [
    "attention_entropy",
    "entropy_table",
    "attention_map",
    "layer_outputs",
    "attention_attribution",
    "attention_network",
    "attention_edges",
    "hub_genes",
    "write_edges",
    "write_graphml",
    "to_networkx",
]
