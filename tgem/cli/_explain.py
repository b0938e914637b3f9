"""``tgem explain`` and ``tgem attention``: gene rankings, ablation, attention analysis."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tgem import attention, interpret
from tgem.cli import _data
from tgem.cli._common import EXIT_OK, CLIError, _model_genes, _safe_name, _subsample
from tgem.cli._output import _prepare_output, _save_figure, _top_genes_figure
from tgem.plotting import plot_ablation, plot_entropy


def _cmd_explain(args) -> int:
    out = _prepare_output(args.output)
    model = _data._load_model(args.model)
    X, y = _data._load_data(args, need_label=True)
    X_model = pd.DataFrame(
        _data._align_to_model(model, X, args.fill_missing),
        columns=_model_genes(model, X),
        index=X.index,
    )
    X_model, y = _subsample(X_model, y, args.max_samples, args.random_state)
    print(f"explain: {args.method} over {len(y)} samples ...", flush=True)
    attributions = interpret.attribute(
        model,
        X_model,
        target="true",
        y=y,
        method=args.method,
        n_steps=args.n_steps,
        random_state=args.random_state,
        verbose=1 if args.verbose >= 2 else 0,
    )
    ranking = interpret.gene_ranking(attributions, y, absolute=args.absolute)
    ranking.to_csv(out / "gene_rankings.csv", index=False)
    interpret.write_rnk(ranking, out / "rnk")
    top = ranking[ranking["rank"] <= args.top]
    print(top.to_string(index=False))
    written = ["gene_rankings.csv", "rnk/<class>.rnk"]
    if _save_figure(lambda: _top_genes_figure(ranking, args.top), out / "top_genes.png"):
        written.append("top_genes.png")
    if args.ablation:
        print("ablation study ...", flush=True)
        ablation = interpret.ablation_study(
            model, X_model, y, ranking=ranking, random_state=args.random_state
        )
        ablation.to_csv(out / "ablation.csv", index=False)
        overall = ablation[ablation["class"] == "all"]
        print(
            overall[
                ["grid", "percent", "n_genes", "accuracy", "accuracy_top", "accuracy_random_mean"]
            ]
            .round(3)
            .to_string(index=False)
        )
        written.append("ablation.csv")
        if _save_figure(lambda: plot_ablation(ablation), out / "ablation.png"):
            written.append("ablation.png")
    print(f"wrote {', '.join(written)} to {out}/")
    return EXIT_OK


def _cmd_attention(args) -> int:
    out = _prepare_output(args.output)
    model = _data._load_model(args.model)
    X, y = _data._load_data(args, need_label=args.target_class is not None)
    X_model = pd.DataFrame(
        _data._align_to_model(model, X, args.fill_missing),
        columns=_model_genes(model, X),
        index=X.index,
    )
    entropy = attention.attention_entropy(model, X_model, per_sample=True)
    attention.entropy_table(entropy).to_csv(out / "entropy.csv", index=False)
    mean = pd.DataFrame(
        entropy.mean(axis=0),
        index=pd.Index(range(entropy.shape[1]), name="layer"),
        columns=pd.Index(range(entropy.shape[2]), name="head"),
    )
    print(
        f"mean attention entropy per layer and head (nats; uniform attention: "
        f"{math.log(X_model.shape[1]):.3f}):"
    )
    print(mean.round(3).to_string())
    written = ["entropy.csv"]
    if _save_figure(lambda: plot_entropy(entropy, n_genes=X_model.shape[1]), out / "entropy.png"):
        written.append("entropy.png")
    if args.target_class is not None:
        if y is None:
            raise CLIError("--class needs --label, to find the samples of the class.")
        classes = [str(c) for c in model.classes_]
        if str(args.target_class) not in classes:
            raise CLIError(
                f"class {args.target_class!r} is not one of the model's classes: {classes}."
            )
        mask = np.asarray([str(v) == str(args.target_class) for v in y])
        if not mask.any():
            raise CLIError(f"no sample of DATA has the label {args.target_class!r}.")
        X_class, _ = _subsample(X_model[mask], np.asarray(y)[mask], args.max_samples, 0)
        target = model.classes_[classes.index(str(args.target_class))]
        print(
            f"attention attribution of {args.target_class!r} over {len(X_class)} samples ...",
            flush=True,
        )
        edges = attention.attention_network(
            model, X_class, target=target, top_fraction=args.top_fraction
        )
        name = _safe_name(args.target_class)
        attention.write_edges(edges, out / f"network_{name}.tsv")
        hubs = attention.hub_genes(edges, top=None)
        hubs.to_csv(out / f"hub_genes_{name}.csv", index=False)
        print(f"{len(edges)} edges; top hub genes of {args.target_class!r}:")
        print(hubs.head(args.top).to_string(index=False))
        written += [f"network_{name}.tsv", f"hub_genes_{name}.csv"]
    print(f"wrote {', '.join(written)} to {out}/")
    return EXIT_OK
