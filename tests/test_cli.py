"""The ``tgem`` command: exit codes, messages, the original flag names, and the outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tgem.cli import EXIT_GENES, EXIT_INPUT, EXIT_MODEL, build_parser, main
from tgem.datasets import load_pbmc68k

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--epoch",
    "2",
    "--learning-rate",
    "1e-3",
    "--batch-size",
    "16",
    "--threads",
    "1",
]


def run_tgem(*args, cwd):
    """Run the command as a user would, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tgem.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A small labelled CSV (3 cell types, 40 genes) and a TSV of new cells."""
    folder = tmp_path_factory.mktemp("cli")
    X, y = load_pbmc68k(return_X_y=True, as_frame=True)
    keep = y.isin(["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]).to_numpy()
    genes = ["LYZ", "CD79A", "MS4A1", "NKG7", "GNLY", "S100A8", "CST3", "FCER1G"]
    genes += [g for g in X.columns if g not in genes][: 40 - len(genes)]
    X, y = X.loc[keep, genes], y[keep]
    X.join(y).to_csv(folder / "train.csv")
    X.iloc[:, ::-1].to_csv(folder / "new.tsv", sep="\t")  # other order, no labels
    X.drop(columns=["LYZ", "NKG7"]).to_csv(folder / "missing_genes.csv")
    (folder / "sets.gmt").write_text(
        "MARKERS\tdemo\tLYZ\tCD79A\tNKG7\tGNLY\tNOT_A_GENE\nMORE\tdemo\tS100A8\tCST3\tMS4A1\n"
    )
    return folder


@pytest.fixture(scope="module")
def trained(tables):
    """A model trained once by ``tgem train`` (in-process), reused by the other tests."""
    out = tables / "model_out"
    code = main(
        [
            "train",
            str(tables / "train.csv"),
            "--label",
            "cell_type",
            "--test-size",
            "0.25",
            "--output",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    return out


# --- parsing: the original scripts' flags -----------------------------------------------


def test_original_flag_names_are_aliases():
    args = build_parser().parse_args(
        [
            "train",
            "data.csv",
            "--label",
            "y",
            "--head_num",
            "3",
            "--learning_rate",
            "0.01",
            "--act_fun",
            "nan",
            "--batch_size",
            "8",
            "--epoch",
            "7",
            "--dropout_rate",
            "0.2",
            "--do_val",
        ]
    )
    assert (
        args.n_heads,
        args.learning_rate,
        args.activation,
        args.batch_size,
        args.max_epochs,
        args.dropout,
        args.early_stopping,
    ) == (3, 0.01, None, 8, 7, 0.2, True)
    args = build_parser().parse_args(
        ["explain", "m.tgem", "d.csv", "--label", "y", "--abs", "--attr_method", "sg_ig"]
    )
    assert args.absolute is True and args.method == "ig_smoothgrad_sq"


def test_early_stopping_flags():
    def parse(*flags):
        return build_parser().parse_args(["train", "d.csv", "--label", "y", *flags])

    assert parse().early_stopping == "auto"  # on from 5,000 training cells
    assert parse("--early-stopping").early_stopping is True
    assert parse("--no-early-stopping").early_stopping is False


def test_model_flag_defaults_are_the_estimators():
    from tgem import TGEMClassifier

    args = build_parser().parse_args(["train", "d.csv", "--label", "y"])
    defaults = TGEMClassifier().get_params()
    for name in (
        "n_layers",
        "n_heads",
        "activation",
        "dropout",
        "learning_rate",
        "batch_size",
        "max_epochs",
        "early_stopping",
        "validation_fraction",
        "calibration",
        "calibration_fraction",
    ):
        assert getattr(args, name) == defaults[name], name


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "d.csv", "--label", "y", "--act_fun", "tanh"],
        ["train", "d.csv", "--label", "y", "--dropout", "1.5"],
        ["explain", "m", "d.csv", "--label", "y", "--attr_method", "shap"],
        ["train", "d.csv"],  # --label is required for training
        ["frobnicate"],
    ],
)
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


# --- exit codes and messages, through a fresh interpreter --------------------------------


def test_subprocess_missing_data_file_exits_2_with_the_path(tmp_path):
    result = run_tgem("train", "nowhere.csv", "--label", "cell_type", cwd=tmp_path)
    assert result.returncode == EXIT_INPUT
    assert "data file 'nowhere.csv' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_subprocess_unknown_label_column_exits_2_and_suggests(tables, tmp_path):
    result = run_tgem("train", tables / "train.csv", "--label", "celltype", cwd=tmp_path)
    assert result.returncode == EXIT_INPUT
    assert "label column 'celltype' is not in the columns" in result.stderr
    assert "Did you mean 'cell_type'" in result.stderr


def test_subprocess_mismatched_genes_exit_3_and_name_them(tables, trained, tmp_path):
    result = run_tgem("predict", trained / "model.tgem", tables / "missing_genes.csv", cwd=tmp_path)
    assert result.returncode == EXIT_GENES
    assert "LYZ" in result.stderr and "NKG7" in result.stderr
    assert "--fill-missing" in result.stderr


@pytest.mark.parametrize("command", ["train", "explain", "attention", "predict"])
def test_an_unwritable_output_folder_exits_2_before_any_work(
    command, tables, trained, tmp_path, capsys, monkeypatch
):
    (tmp_path / "a_file").write_text("not a folder")
    output = tmp_path / "a_file" / "out"  # a folder that cannot be made (root ignores modes)
    work = []
    monkeypatch.setattr("tgem.cli._train._classifier", lambda args: work.append("fit"))
    monkeypatch.setattr("tgem.cli._data._load_model", lambda path: work.append("load"))
    data = ["train", str(tables / "train.csv"), "--label", "cell_type", *TINY]
    if command != "train":
        labelled = command == "explain"
        data = [command, str(trained / "model.tgem")]
        data += [str(tables / "train.csv"), "--label", "cell_type"] if labelled else []
        data += [] if labelled else [str(tables / "new.tsv")]
    target = output / "p.csv" if command == "predict" else output
    code = main([*data, "--output", str(target)])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert "output folder" in err and str(output) in err and "--output" in err
    assert "unexpected" not in err and "Traceback" not in err
    assert work == []  # refused before training or loading anything


def _train_on_table(frame, tmp_path, capsys):
    """Exit code and stderr of `tgem train` on ``frame`` written as a CSV table."""
    frame.to_csv(tmp_path / "table.csv")
    args = ["train", str(tmp_path / "table.csv"), "--label", "cell_type"]
    code = main([*args, "--output", str(tmp_path / "out"), *TINY])
    return code, capsys.readouterr().err


def test_an_all_empty_label_column_names_the_empty_labels(tables, tmp_path, capsys):
    frame = pd.read_csv(tables / "train.csv", index_col=0)
    frame["cell_type"] = np.nan
    code, err = _train_on_table(frame, tmp_path, capsys)
    assert code == EXIT_INPUT
    assert f"label column 'cell_type' is empty: all {len(frame)} labels are missing" in err
    assert "--test-size" not in err


def test_some_missing_labels_are_named(tables, tmp_path, capsys):
    frame = pd.read_csv(tables / "train.csv", index_col=0)
    frame.iloc[[3, 7], frame.columns.get_loc("cell_type")] = np.nan
    code, err = _train_on_table(frame, tmp_path, capsys)
    assert code == EXIT_INPUT
    assert "2 of" in err and str(frame.index[3]) in err and "--test-size" not in err


def test_subprocess_missing_model_file_exits_2(tables, tmp_path):
    result = run_tgem("predict", tmp_path / "none.tgem", tables / "new.tsv", cwd=tmp_path)
    assert result.returncode == EXIT_INPUT
    assert "model file" in result.stderr and "does not exist" in result.stderr


def test_console_script_reports_its_version(tmp_path):
    script = Path(sys.executable).with_name("tgem")
    # the README's test command installs the package, and with it this script
    assert script.exists(), f"no console script at {script}: install tgem (pip install -e .)"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.startswith("tgem ")


# --- train / predict, in-process ------------------------------------------------------------


def test_train_writes_model_metrics_history_and_curves(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "held-out"
    assert metrics["n_test"] > 0 and metrics["n_train"] > metrics["n_test"]
    for key in ("accuracy", "macro_f1", "mcc", "roc_auc"):
        assert 0.0 <= metrics["metrics"][key] <= 1.0 or key == "mcc"
    assert metrics["params"]["n_heads"] == 2 and metrics["params"]["max_epochs"] == 2
    assert len(metrics["history"]) == 2 and len(metrics["genes"]) == 40
    assert (trained / "model.tgem").exists()
    assert len(pd.read_csv(trained / "history.csv")) == 2
    assert (trained / "loss_curves.png").stat().st_size > 0


def test_train_prints_scores_and_confusion_matrix(tables, tmp_path, capsys):
    code = main(
        [
            "train",
            str(tables / "train.csv"),
            "--label",
            "cell_type",
            "--output",
            str(tmp_path / "o"),
            "--act_fun",
            "nan",
            "--do_val",
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for needle in (
        "accuracy",
        "macro-F1",
        "MCC",
        "ROC-AUC",
        "confusion matrix",
        "0=CD14+ Monocyte",
    ):
        assert needle in out
    params = json.loads((tmp_path / "o" / "metrics.json").read_text())["params"]
    assert params["activation"] is None and params["early_stopping"] is True


def test_train_with_calibration_then_annotate_uses_the_fitted_thresholds(tables, tmp_path, capsys):
    anndata = pytest.importorskip("anndata", reason="tgem annotate needs the anndata extra")
    from tgem import load

    out = tmp_path / "o"
    argv = ["train", str(tables / "train.csv"), "--label", "cell_type", "-o", str(out), *TINY]
    code = main([*argv, "--calibration", "temperature", "--calibration-fraction", "0.2"])
    assert code == 0
    assert "calibration: temperature" in capsys.readouterr().out
    model = load(out / "model.tgem")
    assert model.calibration == "temperature" and model.calibration_fraction == 0.2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"]["calibration"] == "temperature"
    assert metrics["calibration"]["temperature"] == pytest.approx(model.temperature_)
    assert metrics["calibration"]["rejection_thresholds"] == pytest.approx(
        model.rejection_thresholds_
    )
    # 0.2 of each class held out: CD14+ Monocyte, CD19+ B and CD56+ NK (3/4 of the cells train)
    held = metrics["calibration"]["n_calibration"]
    assert held == pytest.approx(0.2 * metrics["n_train"], abs=2)

    cells = pd.read_csv(tables / "new.tsv", sep="\t", index_col=0)
    cells.index = cells.index.astype(str)
    anndata.AnnData(cells).write_h5ad(tmp_path / "cells.h5ad")
    for rule in ("max_proba", "energy", "neighbors"):  # only max_proba has a default
        annotated = tmp_path / f"annotated_{rule}.h5ad"
        argv = ["annotate", str(out / "model.tgem"), str(tmp_path / "cells.h5ad")]
        assert main([*argv, "-o", str(annotated), "--rule", rule]) == 0
        back = anndata.read_h5ad(annotated)
        record = back.uns["tgem"]["rejection"]
        assert record["threshold_source"] == "calibration"
        assert record["threshold"] == pytest.approx(model.rejection_thresholds_[rule])
        assert back.uns["tgem"]["params"]["calibration"] == "temperature"
    proba = back.obsm["tgem_probabilities"]
    expected = model.predict_proba(cells[model.feature_names_in_])  # new.tsv: other order
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-6)
    labels = anndata.read_h5ad(tmp_path / "annotated_max_proba.h5ad").obs["tgem_label"]
    below = proba.max(axis=1) < model.rejection_thresholds_["max_proba"]
    np.testing.assert_array_equal(labels.to_numpy() == "unassigned", below)


def test_train_without_calibration_writes_no_calibration(trained):
    from tgem import load

    assert json.loads((trained / "metrics.json").read_text())["calibration"] is None
    assert load(trained / "model.tgem").calibration is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--calibration", "isotonic"], "unknown calibration 'isotonic'; choose temperature"),
        (["--calibration-fraction", "0"], "strictly between 0 and 1, got '0'"),
        (["--calibration-fraction", "1"], "strictly between 0 and 1, got '1'"),
        (["--calibration-fraction", "nan"], "strictly between 0 and 1, got 'nan'"),
        (["--calibration-fraction", "a tenth"], "strictly between 0 and 1, got 'a tenth'"),
    ],
)
def test_bad_calibration_flags_exit_2_with_the_value(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "d.csv", "--label", "y", *flags])
    assert exit_info.value.code == EXIT_INPUT
    assert message in capsys.readouterr().err


def test_calibration_flags_parse_to_the_estimators_values():
    parse = build_parser().parse_args
    args = parse(["train", "d.csv", "--label", "y"])
    assert (args.calibration, args.calibration_fraction) == (None, 0.1)
    args = parse(["train", "d.csv", "--label", "y", "--calibration", "Temperature"])
    assert args.calibration == "temperature"
    assert parse(["train", "d.csv", "--label", "y", "--calibration", "none"]).calibration is None


def test_train_with_gene_sets_keeps_their_genes(tables, tmp_path, capsys):
    code = main(
        [
            "train",
            str(tables / "train.csv"),
            "--label",
            "cell_type",
            "--gene-sets",
            str(tables / "sets.gmt"),
            "--output",
            str(tmp_path / "o"),
            *TINY,
        ]
    )
    assert code == 0
    assert "kept 7 genes of 40; 1 genes of the sets are not in the data" in capsys.readouterr().out
    genes = json.loads((tmp_path / "o" / "metrics.json").read_text())["genes"]
    assert genes == ["LYZ", "CD79A", "MS4A1", "NKG7", "GNLY", "S100A8", "CST3"]  # data order


def test_predict_aligns_reordered_genes_and_writes_probabilities(tables, trained, tmp_path):
    from tgem import load

    out = tmp_path / "pred.csv"
    assert (
        main(
            ["predict", str(trained / "model.tgem"), str(tables / "new.tsv"), "--output", str(out)]
        )
        == 0
    )
    table = pd.read_csv(out, index_col="sample")
    model = load(trained / "model.tgem")
    X = pd.read_csv(tables / "train.csv", index_col=0).drop(columns="cell_type")
    np.testing.assert_array_equal(table["predicted"], model.predict(X))
    proba = table[[c for c in table.columns if c.startswith("proba_")]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_predict_fill_missing_runs_and_labels_give_scores(tables, trained, capsys):
    code = main(
        [
            "predict",
            str(trained / "model.tgem"),
            str(tables / "missing_genes.csv"),
            "--fill-missing",
            "0",
        ]
    )
    assert code == 0
    code = main(
        ["predict", str(trained / "model.tgem"), str(tables / "train.csv"), "--label", "cell_type"]
    )
    captured = capsys.readouterr()
    assert code == 0 and "labelled data" in captured.out and "accuracy" in captured.out


def test_predict_refuses_a_tampered_model_file_with_exit_4(tables, trained, tmp_path, capsys):
    bad = tmp_path / "bad.tgem"
    data = bytearray((trained / "model.tgem").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert main(["predict", str(bad), str(tables / "new.tsv")]) == EXIT_MODEL
    assert "was refused" in capsys.readouterr().err
    bad.write_bytes(b"not a model")
    assert main(["predict", str(bad), str(tables / "new.tsv")]) == EXIT_MODEL


def test_npz_input_and_its_label_errors(tmp_path, capsys):
    X, y = load_pbmc68k(return_X_y=True)
    np.savez(
        tmp_path / "d.npz",
        X=X[:90, :20],
        features=np.array([f"g{i}" for i in range(20)]),
        y_type=y[:90],
    )
    code = main(
        [
            "train",
            str(tmp_path / "d.npz"),
            "--label",
            "y_kind",
            "--output",
            str(tmp_path / "o"),
            *TINY,
        ]
    )
    assert code == EXIT_INPUT
    assert "available label arrays: ['y_type']" in capsys.readouterr().err


def test_bundled_data_refuses_another_label(tmp_path, capsys):
    assert main(["train", "pbmc68k", "--label", "louvain", "--output", str(tmp_path)]) == 2
    assert "pass --label cell_type" in capsys.readouterr().err


# --- the demo -------------------------------------------------------------------------------


def test_subprocess_demo_quick_prints_scores_and_writes_model_and_figures(tmp_path):
    result = run_tgem(
        "demo", "--quick", "--output", tmp_path / "demo", "--threads", "1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    for needle in (
        "accuracy",
        "macro-F1",
        "MCC",
        "ROC-AUC",
        "confusion matrix",
        "top genes per cell type",
        "mean attention entropy per layer",
    ):
        assert needle in result.stdout
    files = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {
        "model.tgem",
        "metrics.json",
        "history.csv",
        "loss_curves.png",
        "entropy.png",
        "entropy.csv",
        "gene_rankings.csv",
        "top_genes.png",
    } <= files
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["n_test"] == 140 and len(metrics["history"]) == 2
    from tgem import load

    model = load(tmp_path / "demo" / "model.tgem")
    assert len(model.classes_) == 10 and model.n_features_in_ == 765


# --- explain / attention, on the small model --------------------------------------------------


def test_explain_writes_rankings_rnk_ablation_and_accepts_original_flags(
    tables, trained, tmp_path, capsys
):
    out = tmp_path / "explain"
    code = main(
        [
            "explain",
            str(trained / "model.tgem"),
            str(tables / "train.csv"),
            "--label",
            "cell_type",
            "--attr_method",
            "ig",
            "--abs",
            "--n-steps",
            "8",
            "--max-samples",
            "30",
            "--top",
            "5",
            "--output",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    ranking = pd.read_csv(out / "gene_rankings.csv")
    assert set(ranking["class"]) == {"CD14+ Monocyte", "CD19+ B", "CD56+ NK"}
    assert (ranking.groupby("class")["gene"].count() == 40).all()
    assert (ranking["mean"] >= 0).all()  # --abs: absolute attributions
    assert len(list((out / "rnk").glob("*.rnk"))) == 3
    ablation = pd.read_csv(out / "ablation.csv")
    assert {"accuracy_top", "accuracy_random_mean"} <= set(ablation.columns)
    assert (out / "top_genes.png").exists() and (out / "ablation.png").exists()


def test_attention_writes_entropy_network_and_hubs(tables, trained, tmp_path, capsys):
    out = tmp_path / "attention"
    code = main(
        [
            "attention",
            str(trained / "model.tgem"),
            str(tables / "train.csv"),
            "--label",
            "cell_type",
            "--class",
            "CD19+ B",
            "--max-samples",
            "10",
            "--top-fraction",
            "0.05",
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "mean attention entropy per layer and head" in printed
    entropy = pd.read_csv(out / "entropy.csv")
    assert entropy["entropy"].between(0, np.log(40) + 1e-9).all()
    edges = pd.read_csv(out / "network_CD19__B.tsv", sep="\t")
    assert len(edges) > 0 and {"query", "key", "score"} <= set(edges.columns)
    assert (out / "hub_genes_CD19__B.csv").exists() and (out / "entropy.png").exists()


def test_attention_unknown_class_is_an_input_error(tables, trained, tmp_path, capsys):
    code = main(
        [
            "attention",
            str(trained / "model.tgem"),
            str(tables / "train.csv"),
            "--label",
            "cell_type",
            "--class",
            "Neutrophil",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == EXIT_INPUT
    assert "'Neutrophil' is not one of the model's classes" in capsys.readouterr().err
