"""Gene-gene networks from attention attribution scores: edges, hub genes, export.

Pure NumPy/pandas (plus torch's ``topk`` on views, no copy of the score matrices); networkx is
needed only by :func:`to_networkx` (the optional ``network`` extra).
"""

from __future__ import annotations

import os
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pandas as pd
import torch

from tgem._naming import default_gene_names


def _as_scores(scores) -> np.ndarray:
    arr = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(
            f"scores must have shape (n_layers, n_genes, n_genes) or (n_genes, "
            f"n_genes), got {arr.shape}; pass attention_attribution's result."
        )
    return arr


def attention_edges(
    scores,
    genes=None,
    *,
    top_fraction: float | None = 0.001,
    threshold: float | None = None,
    normalize: bool = True,
    layers=None,
) -> pd.DataFrame:
    """Tidy edge table from attention attribution scores, as the original's network script.

    Each layer's scores are divided by their largest absolute value (``normalize``); then the
    ``top_fraction`` of the signed scores of all layers together is kept (the original keeps
    the scores above the one at position ``int(top_fraction * n_layers * genes^2)`` in
    decreasing order), or, with ``threshold``, the normalised scores above it. Self-links (the
    diagonal, always 0) are never edges.

    Parameters
    ----------
    scores : ndarray or Tensor of shape (n_layers, n_genes, n_genes) or (n_genes, n_genes)
        From :func:`tgem.attention.attention_attribution`. Not modified.
    genes : sequence of str, optional
        Gene names (default ``gene_<i>``).
    top_fraction : float or None, default=0.001
        Share of all query-key scores (all layers) kept; ignored when ``threshold`` is set.
    threshold : float, optional
        Keep the (normalised) scores strictly above this value instead.
    normalize : bool, default=True
        Divide each layer by its largest absolute score first.
    layers : sequence of int, optional
        Layer numbers written in the ``layer`` column (default 0, 1, ...).

    Returns
    -------
    DataFrame
        Columns ``layer``, ``query``, ``key``, ``score``; one row per kept link from query gene
        to key gene, sorted by decreasing score.

    Examples
    --------
    >>> import numpy as np
    >>> from tgem.attention import attention_edges
    >>> s = np.zeros((2, 3, 3), dtype=np.float32)
    >>> s[0, 0, 1], s[0, 2, 0], s[1, 1, 2] = 4.0, -8.0, 0.5
    >>> attention_edges(s, ["a", "b", "c"], threshold=0.4)
       layer query key  score
    0      1     b   c    1.0
    1      0     a   b    0.5
    """
    arr = _as_scores(scores)
    n_layers, g, _ = arr.shape
    names = np.asarray(default_gene_names(g) if genes is None else genes, dtype=object)
    if names.shape != (g,):
        raise ValueError(f"genes has {names.size} names but the scores have {g} genes.")
    layer_ids = np.arange(n_layers) if layers is None else np.asarray(layers)
    if layer_ids.shape != (n_layers,):
        raise ValueError(f"layers has {layer_ids.size} entries but scores {n_layers} layers.")
    scale = np.ones(n_layers)
    if normalize:
        for li in range(n_layers):
            m = float(np.abs(arr[li]).max())
            scale[li] = m if m > 0 else 1.0
    ls, qs, ks, vs = [], [], [], []

    def add(li, flat_idx, values):
        q_idx, k_idx = np.divmod(flat_idx, g)
        keep = q_idx != k_idx
        ls.append(np.full(int(keep.sum()), li))
        qs.append(q_idx[keep])
        ks.append(k_idx[keep])
        vs.append(values[keep])

    if threshold is None:
        if top_fraction is None or not 0 <= top_fraction <= 1:
            raise ValueError(
                f"top_fraction={top_fraction!r} must lie in [0, 1], or pass threshold=."
            )
        total = n_layers * g * g
        k = min(int(total * top_fraction), total)
        if k == 0:
            return _table([], [], [], [], names, layer_ids)
        # every score above the cut is among its layer's k + 1 largest
        cands = [_layer_top(arr[li].reshape(-1), k + 1, scale[li]) for li in range(n_layers)]
        every = np.concatenate([v for _, v in cands])
        cut = -np.inf if k >= total else np.partition(every, every.size - k - 1)[-k - 1]
        for li, (idx, vals) in enumerate(cands):
            sel = vals > cut
            add(li, idx[sel], vals[sel])
    else:
        rows = max(1, EDGE_CHUNK // max(1, g))
        for li in range(n_layers):
            for r0 in range(0, g, rows):
                block = arr[li, r0 : r0 + rows].astype(np.float64) / scale[li]
                flat = np.flatnonzero(block > threshold)
                add(li, flat + r0 * g, block.reshape(-1)[flat])
    return _table(ls, qs, ks, vs, names, layer_ids)


#: Scores scanned at once by the top-fraction selection (torch.topk's temporaries are several
#: times its input: a whole 12,625-gene layer would add 2.4 GiB).
EDGE_CHUNK = 1 << 22


def _layer_top(flat: np.ndarray, m: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and normalised values of the ``m`` largest scores, chunk by chunk."""
    best_i = np.zeros(0, dtype=np.int64)
    best_v = np.zeros(0, dtype=np.float64)
    step = max(m, EDGE_CHUNK)
    for s0 in range(0, flat.size, step):
        chunk = torch.from_numpy(np.ascontiguousarray(flat[s0 : s0 + step]))
        top = torch.topk(chunk, min(m, chunk.numel()))
        v = np.concatenate([best_v, top.values.double().numpy()])
        i = np.concatenate([best_i, top.indices.numpy().astype(np.int64) + s0])
        if v.size > m:
            keep = np.argpartition(-v, m - 1)[:m]
            v, i = v[keep], i[keep]
        best_v, best_i = v, i
    return best_i, best_v / scale


def _table(ls, qs, ks, vs, names, layer_ids) -> pd.DataFrame:
    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    li, q, k, v = cat(ls, int), cat(qs, int), cat(ks, int), cat(vs, float)
    order = np.lexsort((k, q, li, -v))
    return pd.DataFrame(
        {
            "layer": layer_ids[li[order]].astype(int),
            "query": names[q[order]],
            "key": names[k[order]],
            "score": v[order],
        }
    )


def _check_edges(edges) -> pd.DataFrame:
    if not isinstance(edges, pd.DataFrame) or not {"query", "key", "score"} <= set(edges):
        raise ValueError(
            "edges must be a DataFrame with columns query, key and score (from "
            "attention_edges or attention_network)."
        )
    return edges


def hub_genes(edges: pd.DataFrame, *, top: int | None = 20, by: str = "degree") -> pd.DataFrame:
    """Hub genes of an attention network, ranked by degree or weighted degree.

    A gene's ``out_degree`` counts the edges where it is the query, ``in_degree`` those
    where it is the key (an edge in two layers counts twice), ``degree`` their sum and
    ``weighted_degree`` the sum of the scores of its edges. With a ``class`` column the
    ranking is made per class.

    Parameters
    ----------
    edges : DataFrame
        From :func:`attention_edges` or :func:`attention_network`.
    top : int or None, default=20
        Genes returned per class (None: all).
    by : {"degree", "weighted_degree", "in_degree", "out_degree"}, default="degree"
        Ranking key; ties are broken by weighted degree, then by name.

    Returns
    -------
    DataFrame
        Columns ``[class,] rank, gene, degree, in_degree, out_degree, weighted_degree``.

    Examples
    --------
    >>> import pandas as pd
    >>> from tgem.attention import hub_genes
    >>> edges = pd.DataFrame({"layer": [0, 0, 1], "query": ["a", "c", "a"],
    ...                       "key": ["b", "a", "c"], "score": [1.0, 0.5, 0.2]})
    >>> hub_genes(edges, top=2)
       rank gene  degree  in_degree  out_degree  weighted_degree
    0     1    a       3          1           2              1.7
    1     2    c       2          1           1              0.7
    """
    edges = _check_edges(edges)
    keys = ("degree", "weighted_degree", "in_degree", "out_degree")
    if by not in keys:
        raise ValueError(f"by={by!r} is not one of {keys}.")
    if "class" in edges:
        parts = []
        for c, group in edges.groupby("class", sort=False):
            hubs = _hubs(group, top, by)
            hubs.insert(0, "class", c)
            parts.append(hubs)
        return pd.concat(parts, ignore_index=True) if parts else _hubs(edges, top, by)
    return _hubs(edges, top, by)


def _hubs(edges: pd.DataFrame, top, by) -> pd.DataFrame:
    out_deg = edges.groupby("query").size()
    in_deg = edges.groupby("key").size()
    w = (
        pd.concat(
            [edges.groupby("query")["score"].sum(), edges.groupby("key")["score"].sum()], axis=1
        )
        .fillna(0.0)
        .sum(axis=1)
    )
    genes = sorted(set(out_deg.index) | set(in_deg.index))
    table = pd.DataFrame({"gene": genes})
    table["in_degree"] = in_deg.reindex(genes, fill_value=0).to_numpy()
    table["out_degree"] = out_deg.reindex(genes, fill_value=0).to_numpy()
    table["degree"] = table["in_degree"] + table["out_degree"]
    table["weighted_degree"] = w.reindex(genes, fill_value=0.0).to_numpy()
    secondary = "weighted_degree" if by != "weighted_degree" else "degree"
    table = table.sort_values([by, secondary, "gene"], ascending=[False, False, True])
    if top is not None:
        table = table.head(top)
    table = table.reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table[["rank", "gene", "degree", "in_degree", "out_degree", "weighted_degree"]]


def write_edges(edges: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the edge table as tab-separated text with a header (Cytoscape: File > Import).

    Examples
    --------
    >>> import pandas as pd, tempfile, pathlib
    >>> from tgem.attention import write_edges
    >>> edges = pd.DataFrame({"layer": [0], "query": ["a"], "key": ["b"], "score": [1.0]})
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "net.tsv"
    >>> write_edges(edges, path)
    >>> path.read_text().splitlines()[0]
    'layer\\tquery\\tkey\\tscore'
    """
    _check_edges(edges).to_csv(path, sep="\t", index=False)


_GRAPHML_TYPES = {"i": "long", "u": "long", "f": "double", "b": "boolean"}


def write_graphml(edges: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the network as GraphML (directed, query -> key; other columns as edge data).

    Written directly (no networkx needed); readable by Cytoscape, Gephi and
    ``networkx.read_graphml`` (which returns a multigraph when a pair is linked in several
    layers).

    Examples
    --------
    >>> import pandas as pd, tempfile, pathlib
    >>> from tgem.attention import write_graphml
    >>> edges = pd.DataFrame({"layer": [0, 1], "query": ["a", "b"], "key": ["b", "c"],
    ...                       "score": [1.0, 0.5]})
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "net.graphml"
    >>> write_graphml(edges, path)
    >>> path.read_text().count("<edge ")
    2
    """
    edges = _check_edges(edges)
    attrs = [c for c in edges.columns if c not in ("query", "key")]
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
        'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">',
    ]
    types = {}
    for i, col in enumerate(attrs):
        types[col] = _GRAPHML_TYPES.get(edges[col].dtype.kind, "string")
        lines.append(
            f'  <key id="d{i}" for="edge" attr.name={quoteattr(str(col))} '
            f'attr.type="{types[col]}"/>'
        )
    lines.append('  <graph id="G" edgedefault="directed">')
    nodes = pd.unique(pd.concat([edges["query"], edges["key"]], ignore_index=True))
    lines.extend(f"    <node id={quoteattr(str(n))}/>" for n in nodes)
    columns = [edges[c].to_numpy() for c in attrs]
    for row, (q, k) in enumerate(zip(edges["query"], edges["key"], strict=True)):
        data = "".join(
            f'<data key="d{i}">{escape(_graphml_value(col[row], types[attrs[i]]))}</data>'
            for i, col in enumerate(columns)
        )
        lines.append(
            f"    <edge source={quoteattr(str(q))} target={quoteattr(str(k))}>{data}</edge>"
        )
    lines += ["  </graph>", "</graphml>", ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def _graphml_value(value, kind: str) -> str:
    if kind == "boolean":
        return "true" if value else "false"
    if kind == "double":
        return repr(float(value))
    return str(value)


def to_networkx(edges: pd.DataFrame):
    """The network as a ``networkx.MultiDiGraph`` (query -> key; columns as edge attributes).

    Needs networkx (``pip install "tgem[network]"``). A multigraph because a pair of genes
    can be linked in several layers (and classes).

    Examples
    --------
    >>> import pandas as pd
    >>> from tgem.attention import to_networkx
    >>> edges = pd.DataFrame({"layer": [0, 1], "query": ["a", "a"], "key": ["b", "b"],
    ...                       "score": [1.0, 0.5]})
    >>> graph = to_networkx(edges)
    >>> graph.number_of_nodes(), graph.number_of_edges()
    (2, 2)
    """
    try:
        import networkx as nx
    except ImportError as exc:
        raise ImportError(
            'to_networkx needs networkx; install it with `pip install "tgem[network]"`.'
        ) from exc
    edges = _check_edges(edges)
    graph = nx.MultiDiGraph()
    attrs = [c for c in edges.columns if c not in ("query", "key")]
    for rec in edges.to_dict("records"):
        graph.add_edge(rec["query"], rec["key"], **{a: rec[a] for a in attrs})
    return graph
