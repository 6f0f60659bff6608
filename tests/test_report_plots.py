"""The report's plots, read back from their matplotlib objects: coinciding lines stay apart,
every trade-off point is named, main effects show effects.parquet's numbers."""

import io
import itertools
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from PIL import Image

from sdbatch.evaluation.metrics.clip_score import CLIP_SCORE
from sdbatch.evaluation.metrics.fid import FID
from sdbatch.reporting.plots import (
    effects_figure,
    plots,
    short_label,
    tradeoff_figure,
    versus_figure,
)
from sdbatch.reporting.runs import Run, load_run
from sdbatch.reporting.summary import pareto_front


def table(schedulers=("ddim", "euler"), steps=(3, 20), guidance=(1.0, 2.0, 4.0)) -> pd.DataFrame:
    """A per-configuration table in which every scheduler scores exactly the same."""
    rows = []
    for scheduler, n, g in itertools.product(schedulers, steps, guidance):
        fid, clip = 10 - n / 10 + g, 70 + n / 2 - 2 * g
        rows.append({
            "config_id": f"{scheduler}-s{n}-g{g:g}", "scheduler": scheduler,
            "num_inference_steps": n, "guidance_scale": g,
            "fid": fid, "fid_low": fid - 1, "fid_high": fid + 2,
            "clip_score": clip, "clip_score_low": clip - 1.5, "clip_score_high": clip + 0.5,
            "unet_evals_per_image": n * (2 if g > 1 else 1),
        })  # fmt: skip
    return pd.DataFrame(rows)


def run_of(configs: pd.DataFrame, name: str = "a") -> Run:
    # what the plots read of a run: its name and table
    return Run(name, out=None, configs=configs, metrics=None, record=None)


def check_legible(fig) -> None:
    assert fig.get_size_inches()[0] * fig.dpi <= 1100  # the page's width: never scaled down
    texts = [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
    assert texts and min(t.get_fontsize() for t in texts) >= 9


def lines_of(ax) -> list:
    """The plotted lines (labelled), not the error bars' caps or the baseline marks."""
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def bars(container) -> np.ndarray:
    """An error bar container's bars as rows (x, low, high)."""
    segments = container.lines[2][0].get_segments()
    return np.array([(s[0][0], s[0][1], s[1][1]) for s in segments])


def test_coinciding_lines_differ_in_marker_dash_and_position():
    configs = table()
    # FID's bias can put the estimate below its whole percentile interval
    configs.loc[0, "fid_low"] = configs.loc[0, "fid"] + 0.5
    fig = versus_figure([run_of(configs)], FID, "guidance_scale")
    ax = fig.axes[0]
    lines = lines_of(ax)
    assert len(lines) == 4  # (ddim, euler) x (3, 20 steps)
    assert len({line.get_marker() for line in lines}) == 4
    assert len({line.get_linestyle() for line in lines}) == 4
    assert len({line.get_color() for line in lines}) == 4
    xs = np.concatenate([line.get_xdata() for line in lines])
    assert len(set(xs.round(6))) == len(xs)  # no two points share a position
    # ddim and euler at 3 steps: the same values, side by side
    ddim, euler = lines[0], lines[2]
    np.testing.assert_array_equal(ddim.get_ydata(), euler.get_ydata())
    assert np.all(euler.get_xdata() > ddim.get_xdata())
    # each point's bar is its interval, at the point's own position
    group = configs[(configs["scheduler"] == "ddim") & (configs["num_inference_steps"] == 3)]
    expected = np.column_stack([ddim.get_xdata(), group["fid_low"], group["fid_high"]])
    np.testing.assert_allclose(bars(ax.containers[0]), expected)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "ddim, 3 steps", "ddim, 20 steps", "euler, 3 steps", "euler, 20 steps",
    ]  # fmt: skip
    fig.canvas.draw()  # the layout, as saving it runs
    assert fig.legends[0].get_window_extent().x0 >= ax.get_window_extent().x1  # outside
    check_legible(fig)


def test_many_lines_get_a_panel_per_scheduler_with_one_style_per_line():
    configs = table(schedulers=("ddim", "euler", "pndm"), steps=(3, 10, 20))
    fig = versus_figure([run_of(configs)], CLIP_SCORE, "guidance_scale")
    panels = fig.axes
    assert [ax.get_title() for ax in panels] == ["ddim", "euler", "pndm"]
    assert len({ax.get_ylim() for ax in panels}) == 1  # shared y: panels compare
    styles = [[(line.get_marker(), line.get_linestyle()) for line in lines_of(ax)] for ax in panels]
    assert len(styles[0]) == 3 and len(set(styles[0])) == 3
    assert styles[0] == styles[1] == styles[2]  # "10 steps" looks the same in every panel
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["3 steps", "10 steps", "20 steps"]
    check_legible(fig)


def test_two_runs_are_drawn_apart_and_named():
    a, b = run_of(table(), "a"), run_of(table(), "b")  # identical runs: every pair coincides
    fig = versus_figure([a, b], FID, "num_inference_steps")
    # 2 schedulers x 3 guidance x 2 runs: more than one panel holds
    assert [ax.get_title() for ax in fig.axes] == ["ddim", "euler"]
    for ax in fig.axes:
        xs = np.concatenate([line.get_xdata() for line in lines_of(ax)])
        assert len(ax.containers) == 6 and len(set(xs.round(6))) == len(xs)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:3] == ["guidance 1 (a)", "guidance 2 (a)", "guidance 4 (a)"]
    assert labels[3:] == ["guidance 1 (b)", "guidance 2 (b)", "guidance 4 (b)"]
    check_legible(fig)


def numbers(fig) -> tuple[list, list[str]]:
    """The trade-off's number labels (annotations) and its key's lines."""
    ax, key = fig.axes[0], fig.axes[1]
    labels = [t for t in ax.texts if t.get_text()]
    lines = [line for t in key.texts for line in t.get_text().splitlines()]
    return labels, lines


@pytest.mark.parametrize("count", [1, 2])
def test_every_tradeoff_point_is_numbered_near_it_and_named_in_the_key(count):
    configs = table()
    runs = [run_of(configs, name) for name in ("a", "b")[:count]]
    if count == 2:
        runs[1].configs = configs.assign(fid=configs["fid"] + 0.3)  # B: near A, not on it
    fig = tradeoff_figure(runs)
    labels, key = numbers(fig)
    points = pd.concat([run.configs for run in runs], ignore_index=True)
    named = [int(n) for label in labels for n in label.get_text().split(",")]
    assert sorted(named) == list(range(1, len(points) + 1))  # each point once
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [label.get_window_extent(renderer) for label in labels]
    for label, box in zip(labels, boxes, strict=True):
        # a label sits beside the points it names, and these are drawn on top of each other
        for n in map(int, label.get_text().split(",")):
            x, y = ax.transData.transform(points.loc[n - 1, ["clip_score", "fid"]].to_numpy(float))
            assert box.x0 - 25 < x < box.x1 + 25 and box.y0 - 25 < y < box.y1 + 25
    for one, other in itertools.combinations(boxes, 2):
        assert not one.overlaps(other)
    # and on no marker (4 px around each point)
    pixels = ax.transData.transform(points[["clip_score", "fid"]].to_numpy(float))
    for box in boxes:
        assert not any(
            box.overlaps(Bbox.from_extents(x - 4, y - 4, x + 4, y + 4)) for x, y in pixels
        )
    # the key names every point in order, a star on each run's Pareto front
    assert len(key) == len(points)
    numbered = [(run, row) for run in runs for _, row in run.configs.iterrows()]
    for i, (run, row) in enumerate(numbered, start=1):
        on_front = pareto_front(run.configs)[row.name]
        suffix = f" ({run.name})" if count == 2 else ""
        assert key[i - 1] == f"{i:>2} {short_label(row)}{suffix}" + (" *" if on_front else "")
    if count == 1:
        # ddim and euler score the same: their points coincide and share one label
        assert "1,7" in [label.get_text() for label in labels]
    check_legible(fig)


@pytest.fixture
def evaluated(evaluated_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    return out


def test_main_effects_show_each_level_with_effects_parquet_numbers(evaluated):
    run = load_run(str(evaluated))
    effects = pd.read_parquet(evaluated / "metrics" / "effects.parquet")
    fig = effects_figure([run], FID)
    # the fixture sweeps scheduler and guidance; steps has one level, so no panel
    assert [ax.get_xlabel() for ax in fig.axes] == ["scheduler", "guidance scale"]
    for ax, axis in zip(fig.axes, ("scheduler", "guidance_scale"), strict=True):
        rows = effects[(effects["axis"] == axis) & (effects["column"] == "fid")]
        (container,), (means,) = ax.containers, lines_of(ax)
        np.testing.assert_allclose(np.asarray(means.get_ydata(), float), rows["mean"])
        np.testing.assert_allclose(bars(container)[:, 1:], rows[["low", "high"]])
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        baseline = rows["baseline"].iloc[0]
        assert ticks == [f"{lv}\n(baseline)" if lv == baseline else lv for lv in rows["level"]]
        (line,) = [line for line in ax.lines if line.get_linestyle() == ":"]
        assert line.get_ydata()[0] == pytest.approx(rows.loc[rows["level"] == baseline, "mean"])
    check_legible(fig)

    # two runs: side by side in each panel, named in a legend
    other = load_run(str(evaluated))
    other.name = "b"
    other.effects = effects.assign(**{c: effects[c] + 1 for c in ("mean", "low", "high")})
    fig = effects_figure([run, other], FID)
    for ax in fig.axes:
        a, b = lines_of(ax)
        assert np.all(b.get_xdata() > a.get_xdata())
        ys = [np.asarray(line.get_ydata(), float) for line in (a, b)]
        np.testing.assert_allclose(ys[1], ys[0] + 1)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [run.name, "b"]


def test_report_plots_put_main_effects_first_or_say_why_not(evaluated):
    figures, missing = plots([load_run(str(evaluated))])
    assert [f.name for f in figures] == [
        "clip_score_effects.png", "fid_effects.png", "clip_score_vs_guidance_scale.png",
        "fid_vs_guidance_scale.png", "tradeoff.png",
    ]  # fmt: skip
    assert not any("main effects" in sentence for sentence in missing)
    for figure in figures:
        assert Image.open(io.BytesIO(figure.png)).size[0] <= 1100

    # an output evaluated before effects.parquet existed
    (evaluated / "metrics" / "effects.parquet").unlink()
    run = load_run(str(evaluated))
    figures, missing = plots([run])
    assert not any(f.name.endswith("_effects.png") for f in figures)
    assert (
        f"{run.name} was evaluated before sdbatch computed main effects, so it has no "
        "main-effects plot; rerun sdbatch eval."
    ) in missing
