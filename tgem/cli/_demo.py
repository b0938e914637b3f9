"""``tgem demo``: the default model on the bundled PBMC data, its scores and figures."""

from __future__ import annotations

import math
import time

from tgem import attention, interpret
from tgem.cli import _data
from tgem.cli._common import BUNDLED, EXIT_OK, MODEL_FILE, _subsample
from tgem.cli._output import _prepare_output, _save_figure, _top_genes_figure
from tgem.cli._train import _train_and_report
from tgem.plotting import plot_entropy

#: The demo's training settings: the estimator's defaults, for DEMO_EPOCHS epochs instead of
#: 50 (enough on the 560 training cells; under 5 minutes on 2 cores).
DEMO_EPOCHS = 20
QUICK_EPOCHS = 2
#: Held-out cells (stratified) whose Integrated Gradients give the demo's top-genes figure
#: (None: all of them, so that even the rarest cell type gets a ranking).
DEMO_ATTRIBUTION_SAMPLES = None


def _cmd_demo(args) -> int:
    _prepare_output(args.output)
    if args.quick:
        args.max_epochs = min(args.max_epochs, QUICK_EPOCHS)
    args.data, args.label = BUNDLED, "cell_type"
    X, y = _data._load_data(args, need_label=True)
    start = time.perf_counter()
    clf, X_test, y_test, _ = _train_and_report(args, X, y, args.output, "demo")
    written = [MODEL_FILE, "metrics.json", "history.csv", "loss_curves.png"]
    written += _demo_figures(clf, X_test, y_test, args)
    print(
        f"wrote {', '.join(written)} to {args.output}/ (total {time.perf_counter() - start:.1f} s)"
    )
    return EXIT_OK


def _demo_figures(clf, X_test, y_test, args) -> list[str]:
    """The entropy box plot and the top genes per cell type, on the held-out cells."""
    out = args.output
    entropy = attention.attention_entropy(clf, X_test, per_sample=True)
    attention.entropy_table(entropy).to_csv(out / "entropy.csv", index=False)
    mean = entropy.mean(axis=(0, 2))
    print(
        "mean attention entropy per layer (nats; uniform attention: "
        f"{math.log(X_test.shape[1]):.3f}): " + ", ".join(f"{v:.3f}" for v in mean)
    )
    written = ["entropy.csv"]
    if _save_figure(lambda: plot_entropy(entropy, n_genes=X_test.shape[1]), out / "entropy.png"):
        written.append("entropy.png")
    X_attr, y_attr = _subsample(
        X_test, y_test, 30 if args.quick else DEMO_ATTRIBUTION_SAMPLES, args.random_state
    )
    print(f"Integrated Gradients on {len(y_attr)} held-out cells ...", flush=True)
    attributions = interpret.attribute(
        clf,
        X_attr,
        target="true",
        y=y_attr,
        n_steps=8 if args.quick else 50,
        random_state=args.random_state,
    )
    ranking = interpret.gene_ranking(attributions, y_attr)
    ranking.to_csv(out / "gene_rankings.csv", index=False)
    written.append("gene_rankings.csv")
    top3 = ranking[ranking["rank"] <= 3].groupby("class", sort=False)["gene"].agg(", ".join)
    print("top genes per cell type (mean Integrated Gradients, held-out cells):")
    print("\n".join(f"  {cls}: {genes}" for cls, genes in top3.items()))
    if _save_figure(lambda: _top_genes_figure(ranking, args.top), out / "top_genes.png"):
        written.append("top_genes.png")
    return written
