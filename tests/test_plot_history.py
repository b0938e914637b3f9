"""plot_history: loss and accuracy curves from a classifier's history_."""

import sys

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from tgem.plotting import plot_history  # noqa: E402

HISTORY = [
    {
        "epoch": 1,
        "train_loss": 2.0,
        "train_accuracy": 0.3,
        "valid_loss": 2.1,
        "valid_accuracy": 0.25,
    },
    {
        "epoch": 2,
        "train_loss": 1.5,
        "train_accuracy": 0.5,
        "valid_loss": 1.7,
        "valid_accuracy": 0.4,
    },
    {
        "epoch": 3,
        "train_loss": 1.1,
        "train_accuracy": 0.7,
        "valid_loss": None,
        "valid_accuracy": float("nan"),
    },
]


class _Fitted:
    history_ = HISTORY


def test_plot_history_draws_train_and_validation_curves():
    loss_ax, acc_ax = plot_history(_Fitted())
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert list(lines["training"].get_ydata()) == [2.0, 1.5, 1.1]
    assert list(lines["validation"].get_xdata()) == [1, 2]  # the None epoch is left out
    acc = {line.get_label(): line for line in acc_ax.get_lines()}
    assert list(acc["training"].get_ydata()) == [0.3, 0.5, 0.7]
    assert list(acc["validation"].get_xdata()) == [1, 2]  # NaN left out too
    assert acc_ax.get_xlabel() == "epoch"
    matplotlib.pyplot.close("all")


def test_plot_history_single_metric_on_given_axes():
    fig, ax = matplotlib.pyplot.subplots()
    out = plot_history(
        [{k: v for k, v in r.items() if "valid" not in k} for r in HISTORY], metrics="loss", ax=ax
    )
    assert out is ax
    assert [line.get_label() for line in ax.get_lines()] == ["training"]
    matplotlib.pyplot.close(fig)


def test_plot_history_accepts_a_dataframe():
    import pandas as pd

    ax = plot_history(pd.DataFrame(HISTORY), metrics="accuracy")
    assert len(ax.get_lines()) == 2
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize("bad", [[], object(), [1, 2]])
def test_plot_history_unfitted_or_empty_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="Fit the classifier first"):
        plot_history(bad)


def test_plot_history_rejects_unknown_metric_and_wrong_axes_count():
    with pytest.raises(ValueError, match="metrics must be"):
        plot_history(HISTORY, metrics="f1")
    fig, ax = matplotlib.pyplot.subplots()
    with pytest.raises(ValueError, match="ax must hold 2 Axes"):
        plot_history(HISTORY, ax=ax)
    matplotlib.pyplot.close(fig)


def test_plot_history_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "tgem\[plot\]"'):
        plot_history(HISTORY)
