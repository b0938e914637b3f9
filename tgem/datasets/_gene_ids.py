"""Match gene identifiers between a data set and a model: symbols, Ensembl ids, aliases.

The most frequent failure when a model meets a new data set is that the two name the same
genes differently: Ensembl ids against symbols, version suffixes, case, renamed symbols.
:func:`match_genes` maps each of the model's genes to a column of the data through a gene
table that ships with tgem (built at development time by ``tools/build_gene_table.py``
from Debian's ``r-bioc-org.hs.eg.db``), and reports how, so that nothing is guessed.
"""

from __future__ import annotations

import gzip
import math
import numbers
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import numpy as np

from tgem._text import shown

__all__ = ["GeneMatch", "match_genes"]

#: Share of the model's genes that must be found in the data unless the caller lowers it.
DEFAULT_MIN_OVERLAP = 0.5

#: How a model gene was matched, from the most to the least direct.
METHODS = ("exact", "version", "case", "id_conversion", "alias", "missing")

_TABLES = {"human": "gene_ids_human.tsv.gz"}
_TABLE_COLUMNS = "entrez_id\tsymbol\tensembl_ids\taliases"
_ENSEMBL_GENE = re.compile(r"(ENS[A-Z]*G\d{11})(\.\d+)?", re.IGNORECASE)
_MOUSE_SYMBOL = re.compile(r"[A-Z][a-z][a-z0-9-]*")
_MOUSE_ENSEMBL = re.compile(r"ENSMUSG\d{11}(\.\d+)?")


@dataclass(frozen=True)
class _GeneTable:
    """The gene table of one organism, keyed for look-ups (all keys upper-case)."""

    source: str
    symbols: dict[str, tuple[str, ...]]
    aliases: dict[str, tuple[str, ...]]
    ensembl: dict[str, tuple[str, ...]]
    official: dict[str, str]


@dataclass(frozen=True)
class _Resolved:
    """What the table says a name is: its kind and the Entrez ids it can mean."""

    kind: str  # "ensembl", "symbol", "alias" or "unknown"
    genes: tuple[str, ...]

    @property
    def gene(self) -> str | None:
        return self.genes[0] if len(self.genes) == 1 else None


@dataclass(frozen=True, eq=False)
class GeneMatch:
    """What :func:`match_genes` found: the data column of each model gene, and how.

    Attributes
    ----------
    model_genes : tuple of str
        The model's genes, in model order.
    query_genes : tuple of str
        The data's gene names, in column order.
    index : ndarray of shape (n_model_genes,), int64
        The data column of each model gene, -1 where it is missing: ``X[:, index]``
        (for the genes with ``index >= 0``) puts the data in the model's gene order.
        Read-only.
    methods : tuple of str
        How each model gene was matched: ``"exact"`` (same name), ``"version"`` (same
        Ensembl id once version suffixes are stripped), ``"case"`` (same name ignoring
        case), ``"id_conversion"`` (symbol to Ensembl id or back, through the table),
        ``"alias"`` (through an alias or previous symbol) or ``"missing"``.
    reasons : dict of str to str
        Why each missing model gene was not matched.
    ambiguous : dict of str to tuple of str
        Names that could mean several genes (an alias of several genes, or an Ensembl id
        of several Entrez genes), with the official symbols they could mean. They are
        never guessed. Listed: missing model genes, and data columns left unused that
        could have stood for a model gene.
    unknown : tuple of str
        Missing model genes that the gene table does not know (retired symbols such as
        old clone-based names ``RP11-...``, withdrawn ids, other organisms' genes,
        non-gene features).
    unknown_query : tuple of str
        Data columns left unused that the gene table does not know, by the same rule.
    duplicates : dict of str to tuple of str
        Matched model genes for which other data columns name the same gene too (they
        were left unused: an exact match always wins over a conversion).
    organism : str
        The organism whose gene table was used.
    table_source : str
        Provenance of the gene table (package, version, dates, licence).
    """

    model_genes: tuple[str, ...]
    query_genes: tuple[str, ...]
    index: np.ndarray
    methods: tuple[str, ...]
    reasons: dict[str, str] = field(default_factory=dict)
    ambiguous: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()
    unknown_query: tuple[str, ...] = ()
    duplicates: dict[str, tuple[str, ...]] = field(default_factory=dict)
    organism: str = "human"
    table_source: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """Number of model genes matched by each method (and missing), in method order."""
        return {method: self.methods.count(method) for method in METHODS}

    @property
    def n_matched(self) -> int:
        """Number of model genes found in the data."""
        return int(np.count_nonzero(self.index >= 0))

    @property
    def overlap(self) -> float:
        """Share of the model's genes found in the data, between 0 and 1."""
        return self.n_matched / len(self.model_genes)

    @property
    def missing(self) -> tuple[str, ...]:
        """The model genes not found in the data, in model order."""
        return tuple(g for g, i in zip(self.model_genes, self.index) if i < 0)

    def to_frame(self):
        """One row per model gene: the data column matched, the method and the reason.

        Returns
        -------
        frame : pandas.DataFrame
            Columns ``model_gene``, ``data_gene`` (empty string when missing),
            ``method`` and ``reason`` (empty string when matched).
        """
        import pandas as pd

        return pd.DataFrame(
            {
                "model_gene": list(self.model_genes),
                "data_gene": [self.query_genes[i] if i >= 0 else "" for i in self.index],
                "method": list(self.methods),
                "reason": [self.reasons.get(g, "") for g in self.model_genes],
            }
        )

    def to_dict(self) -> dict:
        """The report as plain, JSON- and ``.h5ad``-safe values (no None anywhere).

        Returns
        -------
        report : dict
            ``organism``, ``table_source``, ``n_genes``, ``n_matched``, ``counts`` (per
            method), ``missing``, ``ambiguous``, ``unknown``, ``unknown_query`` and
            ``duplicates``; names as lists of str.
        """
        return {
            "organism": self.organism,
            "table_source": self.table_source,
            "n_genes": len(self.model_genes),
            "n_matched": self.n_matched,
            "counts": self.counts,
            "missing": list(self.missing),
            "ambiguous": {name: list(genes) for name, genes in self.ambiguous.items()},
            "unknown": list(self.unknown),
            "unknown_query": list(self.unknown_query),
            "duplicates": {name: list(cols) for name, cols in self.duplicates.items()},
        }

    def __str__(self) -> str:
        counts = self.counts
        how = ", ".join(f"{n} {m}" for m, n in counts.items() if n and m != "missing")
        text = (
            f"{self.n_matched} of {len(self.model_genes)} model genes matched "
            f"({self.overlap:.1%}): {how or 'none'}"
        )
        if counts["missing"]:
            text += f"; {counts['missing']} missing ({shown(self.missing, 5)})"
        if self.ambiguous:
            text += f"; {len(self.ambiguous)} ambiguous ({shown(self.ambiguous, 5)})"
        if self.unknown:
            text += f"; {len(self.unknown)} not in the gene table ({shown(self.unknown, 5)})"
        return text


def match_genes(
    query_genes,
    model_genes,
    *,
    organism: str = "human",
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> GeneMatch:
    """Find each of a model's genes among a data set's gene names, across identifiers.

    Matches gene symbols and Ensembl gene ids in either direction (data in ids and model
    in symbols, or the reverse), ignores Ensembl version suffixes (``ENSG00000141510.17``)
    and, for human, case (human symbols are upper-case by convention), and resolves alias
    and previous symbols (``FAM46C`` is now ``TENT5C``), through a gene table that ships
    with tgem. Nothing is downloaded and nothing is guessed: a name that can mean several
    genes is reported as ambiguous and left unmatched.

    For each model gene the first of these rules that finds a data column wins:

    1. ``"exact"``: a column with the same name;
    2. ``"version"`` or ``"case"``: a column with the same Ensembl id once version
       suffixes are stripped, or the same name ignoring case;
    3. ``"id_conversion"``: a column naming the same gene through the table, an official
       symbol against an Ensembl id;
    4. ``"alias"``: the same, where one of the two names is an alias or previous symbol.

    An official symbol is never read as another gene's alias. If a rule finds several
    columns for one model gene, or one column for several model genes, those model genes
    stay missing (the report names the columns); columns already taken by an earlier rule
    are not offered again, so an exact match always wins over a conversion.

    Parameters
    ----------
    query_genes : array-like of str
        The data's gene names, one per column (e.g. ``adata.var_names``).
    model_genes : array-like of str, or a fitted estimator
        The genes the model was fitted on, in order, or an estimator fitted on a
        DataFrame (its ``feature_names_in_`` are used).
    organism : {"human"}, default="human"
        Whose gene table to use. Only human is available: tgem's table is built from
        Debian's ``r-bioc-org.hs.eg.db``, and Debian packages no mouse equivalent.
    min_overlap : float in [0, 1], default=0.5
        The least share of the model's genes that must be found. Below it the call fails:
        with more than half of a model's genes missing the data almost certainly use other
        identifiers or come from another organism, and predictions would mostly reflect
        the filled values. Pass 0 to accept any overlap.

    Returns
    -------
    match : GeneMatch
        The data column of each model gene (``index``, -1 when missing), how it was
        matched, and the missing, ambiguous and unknown names.

    Raises
    ------
    ValueError
        If fewer than ``min_overlap`` of the model's genes are found (the message gives the
        overlap, the likely cause and the fix), if the organism is not supported, if a
        list is empty, or if a list names a gene twice.
    TypeError
        If a gene name is not a string.

    See Also
    --------
    tgem.align_genes : Reorder a data set's columns to a model's genes by exact name.

    Notes
    -----
    The caller fills missing genes. tgem fills them with the model's training mean of the
    gene, the value that moves a prediction least (for standardised inputs it is 0).
    The table is Bioconductor's org.Hs.eg.db (Entrez Gene and Ensembl releases of 2022,
    licence Artistic-2.0; see ``GeneMatch.table_source``). Genes named after it was built
    are unknown to it; they still match by exact name, version or case.

    Examples
    --------
    >>> from tgem.datasets import match_genes
    >>> data = ["ENSG00000167286.10", "lyz", "TENT5C", "XIST"]
    >>> match = match_genes(data, ["CD3D", "LYZ", "FAM46C", "NKG7"], min_overlap=0)
    >>> match.index
    array([ 0,  1,  2, -1])
    >>> match.methods
    ('id_conversion', 'case', 'alias', 'missing')
    >>> print(match)
    3 of 4 model genes matched (75.0%): 1 case, 1 id_conversion, 1 alias; 1 missing (NKG7)
    """
    table = _load_table(_check_organism(organism))
    min_overlap = _check_min_overlap(min_overlap)
    query = _check_names(query_genes, "query_genes", "the data's gene names")
    model = _check_names(model_genes, "model_genes", "the model's genes")
    _check_unique(model, "model_genes", "pass each of the model's genes once.")
    _check_unique(
        query,
        "query_genes",
        "make the data's gene names unique first, e.g. with adata.var_names_make_unique() "
        "or by averaging duplicated columns.",
    )
    match = _Matcher(query, model, table, organism).run()
    if match.overlap < min_overlap:
        raise ValueError(_low_overlap_message(match, min_overlap, table))
    if _share(query, _looks_mouse) > 0.5:
        warnings.warn(
            f"the data's gene names look like mouse genes (e.g. {shown(query, 3)}) and were "
            f"matched to the model's with the {organism} gene table, ignoring case; "
            "same-named orthologues are not the same genes. Use a model trained on the "
            "data's organism.",
            UserWarning,
            stacklevel=2,
        )
    return match


class _Matcher:
    """The matching rules of :func:`match_genes`, applied one after the other."""

    def __init__(self, query, model, table, organism):
        self.query, self.model, self.table, self.organism = query, model, table, organism
        self.index = np.full(len(model), -1, dtype=np.int64)
        self.methods = ["missing"] * len(model)
        self.reasons: dict[str, str] = {}
        self.used = np.zeros(len(query), dtype=bool)
        self.settled = np.zeros(len(model), dtype=bool)  # matched, or refused as ambiguous
        self.query_resolved = [_resolve(name, table) for name in query]
        self.model_resolved = [_resolve(name, table) for name in model]

    def run(self) -> GeneMatch:
        exact = {name: i for i, name in enumerate(self.query)}
        self._apply_rule(lambda j: [exact[self.model[j]]] if self.model[j] in exact else [])
        normalised = defaultdict(list)
        for i, name in enumerate(self.query):
            normalised[_normalise(name)].append(i)
        self._apply_rule(lambda j: normalised.get(_normalise(self.model[j]), []))
        by_gene = defaultdict(list)
        for i, resolved in enumerate(self.query_resolved):
            if resolved.gene is not None:
                by_gene[resolved.gene].append(i)
        self._apply_rule(lambda j: self._same_gene(j, by_gene, alias=False))
        self._apply_rule(lambda j: self._same_gene(j, by_gene, alias=True))
        return self._report(normalised, by_gene)

    def _same_gene(self, j, by_gene, *, alias: bool) -> list[int]:
        resolved = self.model_resolved[j]
        if resolved.gene is None:
            return []
        found = by_gene.get(resolved.gene, [])
        if alias:
            return found
        return [i for i in found if "alias" not in (resolved.kind, self.query_resolved[i].kind)]

    def _apply_rule(self, candidates_of) -> None:
        proposals = {}
        for j in np.flatnonzero(~self.settled):
            candidates = [i for i in candidates_of(j) if not self.used[i]]
            if len(candidates) > 1:
                self.settled[j] = True
                self.reasons[self.model[j]] = (
                    f"several data columns name it ({shown([self.query[i] for i in candidates])}"
                    "); keep one of them"
                )
            elif candidates:
                proposals[j] = candidates[0]
        claimed = defaultdict(list)
        for j, i in proposals.items():
            claimed[i].append(j)
        for i, claimants in claimed.items():
            if len(claimants) > 1:
                others = shown([self.model[j] for j in claimants])
                for j in claimants:
                    self.settled[j] = True
                    self.reasons[self.model[j]] = (
                        f"data column {self.query[i]} names several model genes ({others})"
                    )
                continue
            j = claimants[0]
            self.index[j], self.used[i], self.settled[j] = i, True, True
            self.methods[j] = self._method(j, i)

    def _method(self, j, i) -> str:
        model_name, query_name = self.model[j], self.query[i]
        if model_name == query_name:
            return "exact"
        if _normalise(model_name) == _normalise(query_name):
            return "case" if model_name.upper() == query_name.upper() else "version"
        kinds = (self.model_resolved[j].kind, self.query_resolved[i].kind)
        return "alias" if "alias" in kinds else "id_conversion"

    def _report(self, normalised, by_gene) -> GeneMatch:
        missing = np.flatnonzero(self.index < 0)
        ambiguous, unknown_query = self._unused_query_names(missing)
        unknown = []
        for j in missing:
            name, resolved = self.model[j], self.model_resolved[j]
            if len(resolved.genes) > 1:
                ambiguous[name] = self._symbols(resolved.genes)
                self.reasons.setdefault(
                    name, f"ambiguous: it can mean {shown(ambiguous[name])}; never guessed"
                )
            elif not resolved.genes:
                unknown.append(name)
                self.reasons.setdefault(
                    name, "not in the data, and not in the gene table (retired or unknown)"
                )
            else:
                self.reasons.setdefault(name, "not in the data")
        self.index.setflags(write=False)
        duplicates = {}
        for j in np.flatnonzero(self.index >= 0):
            others = set(normalised.get(_normalise(self.model[j]), []))
            gene = self.model_resolved[j].gene or self.query_resolved[self.index[j]].gene
            others.update(by_gene.get(gene, []) if gene is not None else [])
            others = sorted(i for i in others if not self.used[i])
            if others:
                duplicates[self.model[j]] = tuple(self.query[i] for i in others)
        return GeneMatch(
            model_genes=tuple(self.model),
            query_genes=tuple(self.query),
            index=self.index,
            methods=tuple(self.methods),
            reasons={g: self.reasons[g] for g in self._missing_names() if g in self.reasons},
            ambiguous=ambiguous,
            unknown=tuple(unknown),
            unknown_query=tuple(unknown_query),
            duplicates=duplicates,
            organism=self.organism,
            table_source=self.table.source,
        )

    def _unused_query_names(self, missing):
        """Ambiguous data columns that could stand for a missing model gene, unknown ones."""
        missing_of_gene = {self.model_resolved[j].gene: j for j in missing}
        missing_of_gene.pop(None, None)
        ambiguous, unknown = {}, []
        for i in np.flatnonzero(~self.used):
            name, genes = self.query[i], self.query_resolved[i].genes
            meant = [missing_of_gene[g] for g in genes if g in missing_of_gene]
            if len(genes) > 1 and meant:
                ambiguous[name] = self._symbols(genes)
                for j in meant:
                    self.reasons.setdefault(
                        self.model[j],
                        f"not in the data; data column {name} could mean it but is "
                        f"ambiguous ({shown(ambiguous[name])}): never guessed",
                    )
            elif not genes:
                unknown.append(name)
        return ambiguous, unknown

    def _missing_names(self) -> list[str]:
        return [self.model[j] for j in np.flatnonzero(self.index < 0)]

    def _symbols(self, genes) -> tuple[str, ...]:
        return tuple(sorted(self.table.official[g] for g in genes))


def _resolve(name: str, table: _GeneTable) -> _Resolved:
    ensembl = _ENSEMBL_GENE.fullmatch(name)
    if ensembl is not None:
        return _Resolved("ensembl", table.ensembl.get(ensembl.group(1).upper(), ()))
    key = name.upper()
    if key in table.symbols:
        return _Resolved("symbol", table.symbols[key])
    if key in table.aliases:
        return _Resolved("alias", table.aliases[key])
    return _Resolved("unknown", ())


def _strip_version(name: str) -> str:
    ensembl = _ENSEMBL_GENE.fullmatch(name)
    return name if ensembl is None else ensembl.group(1)


def _normalise(name: str) -> str:
    return _strip_version(name).upper()


def _looks_mouse(name: str) -> bool:
    return bool(_MOUSE_SYMBOL.fullmatch(name) or _MOUSE_ENSEMBL.fullmatch(name))


def _share(names, predicate) -> float:
    return sum(map(predicate, names)) / len(names)


def _low_overlap_message(match: GeneMatch, min_overlap: float, table: _GeneTable) -> str:
    query, model = match.query_genes, match.model_genes
    head = (
        f"only {match.n_matched} of the model's {len(model)} genes ({match.overlap:.1%}) were "
        f"found among the data's {len(query)} gene names, below min_overlap={min_overlap}. "
    )
    if _share(query, _looks_mouse) > 0.5:
        cause = (
            f"The data's genes look like mouse genes (e.g. {shown(query, 3)}) but the model's "
            f"are matched as {match.organism} genes. Use a model trained on the data's organism."
        )
    elif _share(query, lambda n: not _resolve(n, table).genes) > 0.5:
        cause = (
            f"Most of the data's gene names (e.g. {shown(query, 3)}) are neither "
            f"{match.organism} gene symbols nor Ensembl gene ids. Set the data's gene names to "
            "symbols or Ensembl ids (e.g. adata.var_names = adata.var['gene_ids'])."
        )
    else:
        cause = (
            f"The data and the model (e.g. {shown(model, 3)}) share few genes: the data may "
            "be a targeted panel or filtered to other genes. Use data that measure the "
            "model's genes."
        )
    return (
        head + cause + " To go on anyway, pass a lower min_overlap (0 accepts any overlap), "
        "knowing that the missing genes are filled and change predictions."
    )


def _check_organism(organism) -> str:
    if organism == "mouse":
        raise ValueError(
            "organism='mouse' is not supported: tgem ships only a human gene table, built "
            "from Debian's r-bioc-org.hs.eg.db, and Debian has no package of the mouse "
            "equivalent (org.Mm.eg.db) to build one from; tgem downloads nothing at run "
            "time. Match mouse genes by exact name with tgem.align_genes instead."
        )
    if organism not in _TABLES:
        raise ValueError(f"organism must be one of {sorted(_TABLES)}, got {organism!r}.")
    return organism


def _check_min_overlap(min_overlap) -> float:
    valid = isinstance(min_overlap, numbers.Real) and not isinstance(min_overlap, bool)
    if not valid or math.isnan(min_overlap) or not 0 <= min_overlap <= 1:
        raise ValueError(
            f"min_overlap must be a number between 0 and 1, got {min_overlap!r}; pass e.g. "
            f"{DEFAULT_MIN_OVERLAP} (the default) or 0 to accept any overlap."
        )
    return float(min_overlap)


def _check_names(names, parameter: str, what: str) -> list[str]:
    feature_names = getattr(names, "feature_names_in_", None)
    if feature_names is not None:
        names = feature_names
    elif hasattr(names, "fit"):
        raise ValueError(
            f"{parameter} is a {type(names).__name__} without feature_names_in_: it was not "
            "fitted on a DataFrame, so its genes are unknown. Pass the list of its genes."
        )
    if isinstance(names, str | bytes) or isinstance(names, Mapping):
        raise TypeError(
            f"{parameter} must be a list of gene names, got {type(names).__name__} "
            f"{str(names)[:50]!r}; pass e.g. [{str(names)[:20]!r}] or adata.var_names."
        )
    try:
        names = list(names)
    except TypeError:
        raise TypeError(
            f"{parameter} must be a list of gene names, got {type(names).__name__}; pass "
            "e.g. adata.var_names or model.feature_names_in_."
        ) from None
    if not names:
        raise ValueError(f"{parameter} is empty; pass {what}.")
    for position, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(
                f"{parameter}[{position}] is {name!r} ({type(name).__name__}), not a gene "
                f"name; pass {what} as strings (missing names are not allowed)."
            )
        if not name:
            raise ValueError(
                f"{parameter}[{position}] is an empty string; pass {what}, each non-empty."
            )
    return [str(name) for name in names]


def _check_unique(names: list[str], parameter: str, fix: str) -> None:
    seen, twice = set(), []
    for name in names:
        if name in seen and name not in twice:
            twice.append(name)
        seen.add(name)
    if twice:
        raise ValueError(f"{parameter} names {len(twice)} gene(s) twice ({shown(twice)}); {fix}")


@cache
def _load_table(organism: str) -> _GeneTable:
    """Read and check the bundled gene table of ``organism`` (once per process)."""
    name = _TABLES[organism]
    raw = resources.files("tgem.datasets.data").joinpath(name).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").splitlines()
    source = [line[2:] for line in lines if line.startswith("# ")]
    body = [line for line in lines if not line.startswith("#")]
    if not body or body[0] != _TABLE_COLUMNS:
        raise RuntimeError(
            f"the bundled gene table {name} does not start with the columns "
            f"{_TABLE_COLUMNS!r}; the installation is damaged: reinstall tgem."
        )
    symbols, aliases, ensembl, official = {}, {}, {}, {}
    for number, line in enumerate(body[1:], start=1):
        fields = line.split("\t")
        if len(fields) != 4 or not fields[0].isdigit() or not fields[1]:
            raise RuntimeError(
                f"the bundled gene table {name} has a malformed row {number}: {line[:80]!r};"
                " the installation is damaged: reinstall tgem."
            )
        gene, symbol, ids, other = fields
        official[gene] = symbol
        _add(symbols, symbol.upper(), gene)
        for ensembl_id in ids.upper().split(";") if ids else ():
            _add(ensembl, ensembl_id, gene)
        for alias in other.upper().split(";") if other else ():
            _add(aliases, alias, gene)
    return _GeneTable(
        source="; ".join(source),
        symbols=symbols,
        aliases=aliases,
        ensembl=ensembl,
        official=official,
    )


def _add(mapping: dict[str, tuple[str, ...]], key: str, gene: str) -> None:
    genes = mapping.get(key)
    if genes is None:
        mapping[key] = (gene,)
    elif gene not in genes:
        mapping[key] = (*genes, gene)
