"""Gene-identifier matching: tgem.datasets.match_genes and its bundled human gene table."""

import json
import warnings
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from tgem import TGEMClassifier
from tgem.datasets import GeneMatch, load_pbmc68k, match_genes
from tgem.datasets._gene_ids import _load_table, _resolve

TABLE = _load_table("human")
PBMC_GENES = tuple(load_pbmc68k().feature_names)


def _ensembl_of_gene() -> dict[str, str]:
    """Entrez id -> its smallest Ensembl id, for Ensembl ids naming one gene only."""
    found = {}
    for ensembl_id, genes in sorted(TABLE.ensembl.items()):
        if len(genes) == 1:
            found.setdefault(genes[0], ensembl_id)
    return found


ENSEMBL_OF_GENE = _ensembl_of_gene()


def _to_ensembl(genes, version=""):
    """Rename each gene the table resolves to one gene with an Ensembl id; keep the rest."""
    renamed = []
    for name in genes:
        gene = _resolve(name, TABLE).gene
        renamed.append(ENSEMBL_OF_GENE[gene] + version if gene in ENSEMBL_OF_GENE else name)
    return renamed


def _assert_maps_back(match, query, original):
    """Every model gene is matched to the query column that stands for it."""
    assert match.n_matched == len(original)
    assert list(np.asarray(query, dtype=object)[match.index]) == list(original)


# --- the bundled table ------------------------------------------------------------------


def test_table_ships_small_with_its_source_and_licence():
    data = resources.files("tgem.datasets.data").joinpath("gene_ids_human.tsv.gz")
    assert len(data.read_bytes()) < 2_000_000
    licence = resources.files("tgem.datasets.descr").joinpath("LICENSE_org.Hs.eg.db.txt")
    assert "Artistic-2.0" in licence.read_text(encoding="utf-8")
    match = match_genes(["CD3E"], ["CD3E"])
    assert "org.Hs.eg.db 3.16.0" in match.table_source
    assert "Artistic-2.0" in match.table_source
    assert len(TABLE.official) > 60_000


def test_table_gives_mitochondrial_genes_their_hgnc_symbols():
    # NCBI calls MT-ND3 "ND3"; Ensembl, HGNC and 10x use the MT- form
    assert TABLE.official[_resolve("MT-ND3", TABLE).gene] == "ND3"
    assert TABLE.official[_resolve("MT-TF", TABLE).gene] == "TRNF"


# --- renamed PBMC genes map back to the original ones -------------------------------------


@pytest.mark.parametrize("version", ["", ".17"])
def test_pbmc_genes_renamed_to_ensembl_ids_map_back(version):
    renamed = _to_ensembl(PBMC_GENES, version)
    assert sum(a != b for a, b in zip(renamed, PBMC_GENES)) > 700
    order = np.random.default_rng(0).permutation(len(renamed))
    query = [renamed[i] for i in order]
    match = match_genes(query, PBMC_GENES)
    _assert_maps_back(match, query, renamed)
    counts = match.counts
    assert counts["missing"] == 0
    assert counts["id_conversion"] > 650 and counts["alias"] > 40  # old symbols, e.g. FAM65B
    assert counts["exact"] == len(PBMC_GENES) - counts["id_conversion"] - counts["alias"]


def test_model_in_versioned_ensembl_ids_matches_data_in_symbols():
    model = _to_ensembl(PBMC_GENES, ".5")
    match = match_genes(list(PBMC_GENES)[::-1], model)
    _assert_maps_back(match, list(PBMC_GENES)[::-1], PBMC_GENES)


def test_version_suffixes_and_case_are_matched_without_the_table():
    match = match_genes(
        ["ENSG00000999999.3", "my-spike-in", "CD3E"],
        ["CD3E", "ENSG00000999999.1", "MY-SPIKE-IN"],
    )
    assert match.index.tolist() == [2, 0, 1]
    assert match.methods == ("exact", "version", "case")


def test_lower_cased_pbmc_genes_map_back():
    query = [g.lower() for g in PBMC_GENES]
    match = match_genes(query, PBMC_GENES)
    _assert_maps_back(match, query, query)
    assert match.counts["case"] == len(PBMC_GENES)


def _own_aliases() -> dict[str, str]:
    """Entrez id -> its first alias that names no other gene and no official symbol."""
    found = {}
    for alias, genes in sorted(TABLE.aliases.items()):
        if len(genes) == 1 and alias not in TABLE.symbols and alias.isupper():
            found.setdefault(genes[0], alias)
    return found


def _unambiguous_alias(name, own_aliases):
    """An alias of the gene ``name`` names that no other gene uses, or None."""
    return own_aliases.get(_resolve(name, TABLE).gene)


def test_share_of_pbmc_genes_replaced_by_aliases_maps_back():
    rng = np.random.default_rng(1)
    official = [g for g in PBMC_GENES if _resolve(g, TABLE).kind == "symbol"]
    chosen = rng.choice(official, size=40, replace=False)
    own_aliases = _own_aliases()
    aliases = {g: _unambiguous_alias(g, own_aliases) for g in chosen}
    aliases = {g: a for g, a in aliases.items() if a is not None}
    taken = {g.upper() for g in PBMC_GENES}
    aliases = {g: a for g, a in aliases.items() if a not in taken}
    assert len(aliases) >= 30
    query = [aliases.get(g, g) for g in PBMC_GENES]
    match = match_genes(query, PBMC_GENES)
    _assert_maps_back(match, query, query)
    assert match.counts["alias"] == len(aliases)
    renamed = [j for j, g in enumerate(PBMC_GENES) if g in aliases]
    assert {match.methods[j] for j in renamed} == {"alias"}


# --- what is reported, never guessed -------------------------------------------------------


def _ambiguous_alias_of(name):
    gene = _resolve(name, TABLE).gene
    for alias, genes in sorted(TABLE.aliases.items()):
        if len(genes) > 1 and gene in genes and alias not in TABLE.symbols:
            return alias
    raise AssertionError(f"no ambiguous alias of {name}")


def test_ambiguous_alias_in_the_data_is_reported_not_guessed():
    alias = _ambiguous_alias_of("LCK")  # LSK: LCK or MATK
    query = [alias if g == "LCK" else g for g in PBMC_GENES]
    match = match_genes(query, PBMC_GENES)
    assert match.missing == ("LCK",)
    assert "LCK" in match.ambiguous[alias]
    assert len(match.ambiguous[alias]) > 1
    assert f"data column {alias} could mean it but is ambiguous" in match.reasons["LCK"]


def test_ambiguous_and_retired_model_genes_are_reported():
    # PBMC's C7orf55 is an alias of two genes now; RP11-... names were retired by GENCODE
    renamed = _to_ensembl(PBMC_GENES)
    kept = [len(_resolve(g, TABLE).genes) == 1 for g in PBMC_GENES]  # one gene in the table
    query = [r for r, keep in zip(renamed, kept) if keep]
    match = match_genes(query + ["ENSG99999999999"], PBMC_GENES)
    assert "C7orf55" in match.missing
    assert set(match.ambiguous["C7orf55"]) == {"FMC1", "FMC1-LUC7L2"}
    assert "ambiguous" in match.reasons["C7orf55"]
    assert "RP11-782C8.1" in match.unknown
    assert "retired" in match.reasons["RP11-782C8.1"]
    assert set(match.missing) == set(match.unknown) | {"C7orf55"}
    assert match.unknown_query == ("ENSG99999999999",)
    assert "not in the gene table" in str(match)


def test_an_exact_match_wins_and_the_other_column_is_reported():
    match = match_genes(["FAM46C", "TENT5C"], ["TENT5C"])
    assert match.index.tolist() == [1]
    assert match.methods == ("exact",)
    assert match.duplicates == {"TENT5C": ("FAM46C",)}


def test_two_converted_columns_for_one_model_gene_are_refused():
    match = match_genes(["TENT5C", "ENSG00000183508", "CD3E"], ["FAM46C", "CD3E"], min_overlap=0)
    assert match.missing == ("FAM46C",)
    assert "several data columns" in match.reasons["FAM46C"]
    assert "TENT5C" in match.reasons["FAM46C"]


def test_one_column_for_two_model_genes_is_refused():
    model = ["ENSG00000183508.1", "ENSG00000183508.2", "CD3E"]
    match = match_genes(["ENSG00000183508", "CD3E"], model, min_overlap=0)
    assert match.missing == ("ENSG00000183508.1", "ENSG00000183508.2")
    assert "several model genes" in match.reasons["ENSG00000183508.2"]


def test_the_more_direct_rule_takes_a_column_first():
    # TENT5C converts to its Ensembl id directly; FAM46C (its old symbol) only through an alias
    match = match_genes(["ENSG00000183508", "CD3E"], ["FAM46C", "TENT5C", "CD3E"], min_overlap=0)
    assert match.methods == ("missing", "id_conversion", "exact")


def test_official_symbol_is_never_read_as_another_genes_alias():
    # FCGR3A is an official symbol, and also listed as an alias of FCGR3B
    fcgr3a, fcgr3b = "ENSG00000203747", "ENSG00000162747"
    assert TABLE.official[_resolve(fcgr3b, TABLE).gene] == "FCGR3B"
    assert _resolve(fcgr3b, TABLE).gene in TABLE.aliases["FCGR3A"]
    assert match_genes([fcgr3a], ["FCGR3A"]).methods == ("id_conversion",)
    assert match_genes([fcgr3b], ["FCGR3A"], min_overlap=0).missing == ("FCGR3A",)
    assert match_genes(["FCGR3A"], [fcgr3b], min_overlap=0).missing == (fcgr3b,)


# --- the report -----------------------------------------------------------------------------


def test_report_converts_to_a_frame_and_to_plain_values():
    match = match_genes(["ENSG00000167286.10", "lyz"], ["CD3D", "LYZ", "NKG7"], min_overlap=0)
    assert isinstance(match, GeneMatch)
    frame = match.to_frame()
    assert frame.shape == (3, 4)
    assert frame["data_gene"].tolist() == ["ENSG00000167286.10", "lyz", ""]
    plain = match.to_dict()
    text = json.dumps(plain)
    assert "null" not in text
    assert plain["counts"]["missing"] == 1 and plain["missing"] == ["NKG7"]
    with pytest.raises(ValueError, match="read-only"):
        match.index[0] = 5


def test_inputs_are_not_modified_and_an_estimator_gives_its_genes():
    query = np.array(["cd3e", "LYZ"], dtype=object)
    before = query.copy()

    class Fitted:
        feature_names_in_ = np.array(["LYZ", "CD3E"], dtype=object)

        def fit(self):
            pass

    match = match_genes(query, Fitted())
    np.testing.assert_array_equal(query, before)
    assert match.index.tolist() == [1, 0]
    assert match_genes(pd.Index(["CD3E"]), pd.Series(["CD3E"])).index.tolist() == [0]


# --- errors ---------------------------------------------------------------------------------


def test_below_the_overlap_the_call_fails_naming_the_cause():
    with pytest.raises(ValueError, match=r"only 0 of the model's 765 genes \(0.0%\).*neither"):
        match_genes([f"feature_{i}" for i in range(100)], PBMC_GENES)
    mouse = [f"ENSMUSG{i:011d}" for i in range(100)]
    with pytest.raises(ValueError, match="look like mouse genes.*min_overlap"):
        match_genes(mouse, PBMC_GENES)
    other = ["TP53", "BRCA1", "EGFR", "MYC"]
    with pytest.raises(ValueError, match="share few genes"):
        match_genes(other + list(PBMC_GENES[:300]), PBMC_GENES)
    match = match_genes(other + list(PBMC_GENES[:300]), PBMC_GENES, min_overlap=0.3)
    assert match.n_matched == 300


def test_mouse_style_symbols_warn_that_orthologues_are_not_the_same_genes():
    mouse_style = [g[0] + g[1:].lower() for g in PBMC_GENES]
    with pytest.warns(UserWarning, match="look like mouse genes"):
        match_genes(mouse_style, PBMC_GENES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        match_genes(list(PBMC_GENES), PBMC_GENES)


def test_mouse_is_refused_naming_why():
    with pytest.raises(ValueError, match="organism='mouse' is not supported.*org.Mm.eg.db"):
        match_genes(["Cd3e"], ["Cd3e"], organism="mouse")
    with pytest.raises(ValueError, match=r"organism must be one of \['human'\], got 'rat'"):
        match_genes(["CD3E"], ["CD3E"], organism="rat")


@pytest.mark.parametrize(
    "query, model, error, message",
    [
        ([], ["CD3E"], ValueError, "query_genes is empty"),
        (["CD3E"], [], ValueError, "model_genes is empty"),
        (["CD3E"], ["CD3E", "LYZ", "CD3E"], ValueError, r"model_genes names 1 gene\(s\) twice"),
        (["CD3E", "CD3E"], ["CD3E"], ValueError, "var_names_make_unique"),
        (["CD3E", None], ["CD3E"], TypeError, r"query_genes\[1\] is None"),
        (["CD3E", np.nan], ["CD3E"], TypeError, r"query_genes\[1\] is nan \(float\)"),
        (["CD3E"], ["CD3E", 3], TypeError, r"model_genes\[1\] is 3 \(int\)"),
        (["CD3E", ""], ["CD3E"], ValueError, r"query_genes\[1\] is an empty string"),
        ("CD3E", ["CD3E"], TypeError, "must be a list of gene names, got str"),
        (["CD3E"], 5, TypeError, "must be a list of gene names, got int"),
    ],
)
def test_bad_gene_lists_give_clear_errors(query, model, error, message):
    with pytest.raises(error, match=message):
        match_genes(query, model)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "half", None])
def test_min_overlap_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match=r"min_overlap must be a number between 0 and 1"):
        match_genes(["CD3E"], ["CD3E"], min_overlap=value)


def test_an_unfitted_estimator_is_refused():
    with pytest.raises(ValueError, match="without feature_names_in_"):
        match_genes(["CD3E"], TGEMClassifier())


# --- end to end -----------------------------------------------------------------------------


def test_predictions_identical_on_renamed_and_shuffled_data():
    X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    X = X.iloc[:, :30]
    model = TGEMClassifier(max_epochs=2, n_layers=1, n_heads=2, random_state=0, device="cpu")
    model.fit(X, y)
    expected = model.predict(X)
    order = np.random.default_rng(2).permutation(X.shape[1])
    renamed = X.iloc[:, order].copy()
    renamed.columns = _to_ensembl(renamed.columns, version=".9")
    assert not set(renamed.columns) & set(X.columns) - {"RP11-782C8.1"}
    match = match_genes(renamed.columns, model)
    assert match.n_matched == X.shape[1]
    aligned = renamed.iloc[:, match.index].set_axis(model.feature_names_in_, axis=1)
    np.testing.assert_array_equal(model.predict(aligned), expected)
