"""``tgem train``: fit a classifier on labelled data, report its scores, write the model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tgem._classifier import TGEMClassifier
from tgem._gene_sets import GeneSetSelector
from tgem._reporting import classification_metrics, format_metrics, metrics_to_json
from tgem._scale import check_log_scale
from tgem.cli import _data
from tgem.cli._common import EXIT_OK, MODEL_FILE, CLIError
from tgem.cli._output import _clean_history, _prepare_output, _save_figure, _write_json
from tgem.plotting import plot_history


def _classifier(args):
    return TGEMClassifier(
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        activation=args.activation,
        dropout=args.dropout,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        weight_decay=args.weight_decay,
        standardize=args.standardize,
        early_stopping=args.early_stopping,
        validation_fraction=args.validation_fraction,
        n_iter_no_change=args.n_iter_no_change,
        calibration=args.calibration,
        calibration_fraction=args.calibration_fraction,
        class_weight=args.class_weight,
        attention_backend=args.attention_backend,
        tree_tolerance=args.tree_tolerance,
        device=args.device,
        n_threads=args.threads,
        random_state=args.random_state,
        verbose=1 if args.verbose >= 2 else 0,
    )


def _split(X, y, test_size: float, random_state: int):
    if test_size == 0:
        return X, None, y, None
    try:
        return train_test_split(X, y, test_size=test_size, stratify=y, random_state=random_state)
    except ValueError as exc:
        raise CLIError(
            f"cannot make a stratified {test_size:.0%} held-out split: {exc}. "
            "Pass a larger --test-size, or --test-size 0."
        ) from exc


def _train_and_report(args, X, y, out: Path, title: str) -> tuple:
    _data._check_labels(y, args.label or "cell_type", X.index)
    check_log_scale(X)
    X_train, X_test, y_train, y_test = _split(X, y, args.test_size, args.random_state)
    clf = _classifier(args)
    print(
        f"{title}: {X_train.shape[0]} training samples, "
        f"{0 if X_test is None else X_test.shape[0]} held out, {X.shape[1]} genes, "
        f"{len(np.unique(y))} classes; training {clf.max_epochs} epochs ...",
        flush=True,
    )
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    fit_seconds = time.perf_counter() - start
    print(
        f"trained in {fit_seconds:.1f} s on {clf.device_} "
        f"(attention backend: {clf.attention_backend_})"
    )
    if clf.calibration is not None:
        report = clf.calibration_report_
        thresholds = ", ".join(f"{k} {v:.4g}" for k, v in clf.rejection_thresholds_.items())
        print(
            f"calibration: temperature {report['temperature']:.4g} fitted on "
            f"{report['n_calibration']} held-out cells (network trained on "
            f"{report['n_train']}); rejection thresholds {thresholds}"
        )
    scored_X, scored_y, which = (
        (X_train, y_train, "training data") if X_test is None else (X_test, y_test, "held-out")
    )
    metrics = classification_metrics(scored_y, clf.predict_proba(scored_X), clf.classes_)
    print(format_metrics(metrics, which))
    model_path = out / MODEL_FILE
    clf.save(model_path)
    pd.DataFrame(clf.history_).to_csv(out / "history.csv", index=False)
    _save_figure(lambda: plot_history(clf), out / "loss_curves.png")
    _write_json(
        out / "metrics.json",
        {
            "evaluated_on": which,
            "metrics": metrics_to_json(metrics),
            "fit_seconds": fit_seconds,
            "n_train": int(X_train.shape[0]),
            "n_test": 0 if X_test is None else int(X_test.shape[0]),
            "genes": list(map(str, X.columns)),
            "params": {k: v for k, v in clf.get_params().items() if k != "random_state"}
            | {"random_state": args.random_state},
            "device": str(clf.device_),
            "calibration": None
            if clf.calibration is None
            else {
                **clf.calibration_report_,
                "rejection_thresholds": dict(clf.rejection_thresholds_),
            },
            "history": _clean_history(clf.history_),
        },
    )
    return clf, X_test, y_test, metrics


def _cmd_train(args) -> int:
    _prepare_output(args.output)
    X, y = _data._load_data(args, need_label=True)
    if args.gene_sets is not None:
        if not args.gene_sets.exists():
            raise CLIError(f"gene-set file {str(args.gene_sets)!r} does not exist; check the path.")
        selector = GeneSetSelector(str(args.gene_sets)).set_output(transform="pandas")
        X = selector.fit_transform(X)
        print(
            f"gene sets: kept {X.shape[1]} genes of {selector.n_features_in_}; "
            f"{len(selector.missing_genes_)} genes of the sets are not in the data"
        )
    _train_and_report(args, X, y, args.output, "train")
    print(
        f"wrote {args.output / MODEL_FILE}, metrics.json, history.csv and loss_curves.png "
        f"to {args.output}/"
    )
    return EXIT_OK
