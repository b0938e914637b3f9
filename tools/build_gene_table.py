"""Build tgem's human gene-identifier table from Bioconductor's org.Hs.eg.db.

The table ships inside tgem (``tgem/datasets/data/gene_ids_human.tsv.gz``) and is read by
:func:`tgem.datasets.match_genes`; nothing is downloaded at run time. This script is run at
development time only, to rebuild the table when a newer org.Hs.eg.db is packaged.

Source: the registry package ``r-bioc-org.hs.eg.db`` of Debian (Bioconductor's
org.Hs.eg.db, Entrez Gene based, licence Artistic-2.0). Its data is one SQLite file,
read here with Python's ``sqlite3``; R is not needed. There is no Debian package of the
mouse equivalent (``org.Mm.eg.db``), so tgem ships no mouse table.

One row per Entrez gene, tab-separated, after ``#`` lines recording the source:

- ``entrez_id``: the NCBI (Entrez) gene id;
- ``symbol``: the official symbol;
- ``ensembl_ids``: the Ensembl gene ids, ``;``-separated (may be empty);
- ``aliases``: the alias and previous symbols, ``;``-separated, without the official one.

Genes of NCBI type ``unknown`` (phenotype loci without a sequence, e.g. "HBD",
hypophosphatemic bone disease) and ``biological-region`` (enhancers, deletion regions) are
left out: they are never an expression-matrix column, and keeping them would make real
symbols ambiguous (HBD, TEC, MEMO1, MMD2 name both a protein-coding gene and such a locus).

NCBI names the 37 mitochondrial genes without the ``MT-`` prefix that HGNC, Ensembl and
10x Genomics use (``ND3``, ``COX1``, ``TRNF`` for ``MT-ND3``, ``MT-CO1``, ``MT-TF``). The
HGNC form is added to their aliases: ``MT-`` plus the rest of each ``MT...`` alias
(``MTCO1`` gives ``MT-CO1``), and ``MT-T`` plus the rest of a ``TRN...`` symbol.

Rebuild
-------
Install the registry package and run the script from the repository root::

    apt-get update && apt-get install -y r-bioc-org.hs.eg.db
    python tools/build_gene_table.py

Without root, unpack the package instead and point the script at it::

    apt-get download r-bioc-org.hs.eg.db
    dpkg-deb -x r-bioc-org.hs.eg.db_*_all.deb /tmp/orghs
    python tools/build_gene_table.py --root /tmp/orghs

The script also copies the package's copyright file (its licence) to
``tgem/datasets/descr/LICENSE_org.Hs.eg.db.txt``. The output is byte-for-byte reproducible
(gzip without a time stamp, rows sorted by Entrez id).
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sqlite3
from collections import defaultdict
from pathlib import Path

PACKAGE = "r-bioc-org.hs.eg.db"
R_LIBRARY = "usr/lib/R/site-library/org.Hs.eg.db"
SQLITE = f"{R_LIBRARY}/extdata/org.Hs.eg.sqlite"
DESCRIPTION = f"{R_LIBRARY}/DESCRIPTION"
COPYRIGHT = f"usr/share/doc/{PACKAGE}/copyright"
CHANGELOG = f"usr/share/doc/{PACKAGE}/changelog.Debian.gz"
LEFT_OUT_TYPES = ("unknown", "biological-region")

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "tgem" / "datasets" / "data" / "gene_ids_human.tsv.gz"
LICENSE = REPO / "tgem" / "datasets" / "descr" / "LICENSE_org.Hs.eg.db.txt"


def read_genes(connection: sqlite3.Connection) -> list[tuple[str, str, list[str], list[str]]]:
    """Return (entrez id, symbol, Ensembl ids, aliases) for each kept gene, by Entrez id."""
    placeholders = ",".join("?" * len(LEFT_OUT_TYPES))
    genes = connection.execute(
        "SELECT g._id, g.gene_id, i.symbol FROM genes g JOIN gene_info i USING (_id) "
        f"JOIN genetype t USING (_id) WHERE t.gene_type NOT IN ({placeholders})",
        LEFT_OUT_TYPES,
    ).fetchall()
    ensembl = defaultdict(set)
    for key, ensembl_id in connection.execute("SELECT _id, ensembl_id FROM ensembl"):
        ensembl[key].add(ensembl_id)
    aliases = defaultdict(set)
    for key, alias in connection.execute("SELECT _id, alias_symbol FROM alias"):
        aliases[key].add(alias)
    mitochondrial = connection.execute(
        "SELECT _id, symbol FROM gene_info JOIN chromosomes USING (_id) WHERE chromosome = 'MT'"
    )
    for key, symbol in mitochondrial:
        aliases[key] |= hgnc_mitochondrial_symbols(symbol, aliases[key])
    rows = []
    for key, entrez_id, symbol in genes:
        rows.append((entrez_id, symbol, sorted(ensembl[key]), sorted(aliases[key] - {symbol})))
    rows.sort(key=lambda row: int(row[0]))
    return rows


def hgnc_mitochondrial_symbols(symbol: str, aliases) -> set[str]:
    """The HGNC ``MT-`` symbols of a mitochondrial gene from its NCBI symbol and aliases."""
    found = {"MT-" + alias[2:] for alias in aliases if re.fullmatch(r"MT[A-Z][A-Z0-9]*", alias)}
    if re.fullmatch(r"TRN[A-Z][0-9]?", symbol):
        found.add("MT-T" + symbol[3:])
    return found


def source_lines(connection: sqlite3.Connection, root: Path) -> list[str]:
    """The ``#`` header: package versions, source dates and licence."""
    metadata = dict(connection.execute("SELECT name, value FROM metadata"))
    description = (root / DESCRIPTION).read_text(encoding="utf-8")
    version = re.search(r"^Version:\s*(\S+)", description, re.MULTILINE).group(1)
    licence = re.search(r"^License:\s*(.+)$", description, re.MULTILINE).group(1).strip()
    with gzip.open(root / CHANGELOG, "rt", encoding="utf-8") as changelog:
        debian_version = re.search(r"\(([^)]+)\)", changelog.readline()).group(1)
    return [
        f"# source: Bioconductor org.Hs.eg.db {version} (Debian package {PACKAGE} "
        f"{debian_version})",
        f"# organism: {metadata['ORGANISM']} (taxon {metadata['TAXID']})",
        f"# Entrez Gene: {metadata['EGSOURCEDATE']}; Ensembl: {metadata['ENSOURCEDATE']}",
        f"# licence: {licence}, see tgem/datasets/descr/{LICENSE.name}",
        f"# left out: genes of NCBI type {', '.join(LEFT_OUT_TYPES)}",
        "# built by tools/build_gene_table.py",
    ]


def write_table(rows, header: list[str], path: Path) -> None:
    """Write the rows as a reproducible gzipped TSV."""
    text = io.StringIO()
    for line in header:
        text.write(line + "\n")
    text.write("entrez_id\tsymbol\tensembl_ids\taliases\n")
    for entrez_id, symbol, ensembl_ids, aliases in rows:
        text.write(f"{entrez_id}\t{symbol}\t{';'.join(ensembl_ids)}\t{';'.join(aliases)}\n")
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write(text.getvalue().encode("utf-8"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help=f"where {PACKAGE} is installed or unpacked (default: /)",
    )
    args = parser.parse_args(argv)
    sqlite_path = args.root / SQLITE
    if not sqlite_path.is_file():
        raise SystemExit(
            f"{sqlite_path} not found; install {PACKAGE} (apt-get install -y {PACKAGE}) or "
            "pass --root where it is unpacked."
        )
    connection = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        rows = read_genes(connection)
        header = source_lines(connection, args.root)
    finally:
        connection.close()
    write_table(rows, header, TABLE)
    LICENSE.write_bytes((args.root / COPYRIGHT).read_bytes())
    n_ensembl = sum(bool(row[2]) for row in rows)
    size = TABLE.stat().st_size
    print(f"{TABLE}: {len(rows)} genes, {n_ensembl} with an Ensembl id, {size} bytes")


if __name__ == "__main__":
    main()
