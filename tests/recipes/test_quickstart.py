"""The quickstart's statements follow its measurements, and its figure puts each method beside its baseline."""

import matplotlib

matplotlib.use("Agg")

from recipes import quickstart  # noqa: E402


def _results(redi, dpo, q, full):
    return {
        "REDI": {
            "accuracy_after_sft": 0.80,
            "accuracy_after_redi": redi,
            "accuracy_dpo": dpo,
            "step_time_vs_dpo": 0.7,
            "curves": {"REDI": ([0, 100], [0.8, redi]), "DPO": ([0, 100], [0.8, dpo])},
        },
        "Q-Tuning": {
            "accuracy_after": q,
            "accuracy_full_sft": full,
            "time_ratio": 0.5,
            "curves": {"Q-Tuning": ([0, 32], [0.9, q]), "full-data SFT": ([0, 32], [0.9, full])},
        },
    }


def test_findings_follow_the_numbers():
    up = quickstart.findings(_results(redi=0.70, dpo=0.60, q=0.50, full=0.55))
    down = quickstart.findings(_results(redi=0.60, dpo=0.70, q=0.55, full=0.50))
    assert "REDI ended below it (70.0%) and DPO below it (60.0%); REDI ended above DPO" in up[0]
    assert "REDI ended above DPO" not in down[0] and "REDI ended below DPO" in down[0]
    assert up[1].startswith("Q-Tuning ended below full-data SFT (50.0% vs 55.0%)")
    assert down[1].startswith("Q-Tuning ended above full-data SFT (55.0% vs 50.0%)")
    level = quickstart.findings(_results(redi=0.6, dpo=0.6, q=0.5, full=0.5))
    assert "level with DPO" in level[0] and "level with full-data SFT" in level[1]


def test_curves_share_axes_and_say_what_they_plot(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    quickstart._plot_curves(_results(redi=0.7, dpo=0.6, q=0.5, full=0.55), tmp_path / "curves.png")
    (fig,) = figures
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [quickstart.PANELS["REDI"][0], quickstart.PANELS["Q-Tuning"][0]]
    for ax, name in zip(axes, ("REDI", "Q-Tuning")):
        assert ax.get_xlabel() == quickstart.PANELS[name][1] and ax.get_ylabel() == quickstart.PANELS[name][2]
        labels = [line.get_label() for line in ax.get_lines()]
        assert len([label for label in labels if not label.startswith("_")]) >= 2  # method and baseline
