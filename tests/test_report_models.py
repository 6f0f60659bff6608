"""The report of a run with several models and adapters: each one against the baseline with paired
differences, main effects over model, adapter and scale, metric vs adapter scale, and plots and
tables split by model. Every number is checked against a direct computation on synthetic tables:
2 models x (no adapter + an adapter at 3 scales) x 2 schedulers x 2 guidance scales."""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from sdbatch.adapters import AdapterSource
from sdbatch.evaluation.compare import best_versus_others, main_effects
from sdbatch.evaluation.metrics.attributes import ATTRIBUTE_ACCURACY
from sdbatch.evaluation.metrics.clip_score import CLIP_SCORE
from sdbatch.evaluation.metrics.fid import FID
from sdbatch.records import RunRecord
from sdbatch.reporting.plots import scale_figure, tradeoff_figure, versus_figure
from sdbatch.reporting.runs import baseline_of, load_run
from sdbatch.reporting.summary import models_and_adapters
from sdbatch.reporting.write import write_report

MODELS = ("builtin:tiny", "./checkpoints/step-4000")
ADAPTER = "builtin:toy-purple"
SCALES = (0.25, 0.5, 1.0)
SCHEDULERS = ("ddim", "euler_a")
GUIDANCE = (1.0, 7.5)
REPLICATES = 200
CONFIDENCE = 0.95  # the fixture suite's
METRICS = (CLIP_SCORE, ATTRIBUTE_ACCURACY, FID)  # in the registry's order, as the report
SAMPLING = ["scheduler", "num_inference_steps", "guidance_scale"]


def synthetic_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """configs.parquet and replicates.parquet in the sweep's order (model, adapter, scale,
    scheduler, guidance): the adapter raises CLIP score and accuracy with its scale and worsens
    FID; the second model is better in CLIP score and alike in FID. Every replicate shares what
    its draw of prompts adds to all configurations, which pairing cancels."""
    rng = np.random.default_rng(5)
    shared = rng.normal(0, 1, REPLICATES)
    rows, replicates = [], []
    variants = [(None, None), *((ADAPTER, s) for s in SCALES)]
    for (m, model), (lora, scale), scheduler, g in itertools.product(
        enumerate(MODELS), variants, SCHEDULERS, GUIDANCE
    ):
        s = scale or 0.0
        config_id = f"m{m}-{lora and 'purple'}-{scale}-{scheduler}-g{g:g}"
        values = {
            "clip_score": 20 + 2 * m + 4 * s + (g > 1),
            "fid": 30 + 5 * s - (scheduler == "ddim"),
            "attribute_accuracy": 0.5 + 0.3 * s - 0.02 * m,
        }
        noise = {"clip_score": 0.3, "fid": 0.5, "attribute_accuracy": 0.02}
        spread = {"clip_score": 1.0, "fid": 2.0, "attribute_accuracy": 0.05}
        drawn = {c: v + spread[c] * shared + rng.normal(0, noise[c], REPLICATES)
                 for c, v in values.items()}  # fmt: skip
        row = {
            "config_id": config_id, "model": model, "lora": lora, "lora_scale": scale,
            "scheduler": scheduler, "num_inference_steps": 2, "guidance_scale": g,
            "n_images": 10, "n_flagged": None, "n_excluded": 0,
            "unet_evals_per_image": 2 * (1 + (g > 1)), "seconds_per_image_median": 0.01,
            "seconds_per_image_q1": 0.01, "seconds_per_image_q3": 0.01, "timed_batches": 2,
            "warmup_batches": 1, "devices": "cpu",
        }  # fmt: skip
        for column, value in values.items():
            row[column] = value
            row[f"{column}_low"], row[f"{column}_high"] = np.quantile(drawn[column], [0.025, 0.975])
        rows.append(row)
        replicates.append(pd.DataFrame({"config_id": config_id,
                                        "replicate": np.arange(REPLICATES), **drawn}))  # fmt: skip
    configs = pd.DataFrame(rows).astype({"n_flagged": "Int64", "lora_scale": float})
    return configs, pd.concat(replicates, ignore_index=True)


def write_tables(out, configs: pd.DataFrame, replicates: pd.DataFrame) -> None:
    """An evaluated output's metrics tables replaced by these, as evaluation writes them."""
    metrics = out / "metrics"
    (metrics / "images.parquet").unlink(missing_ok=True)  # per-image scores of other configurations
    configs.to_parquet(metrics / "configs.parquet", index=False)
    replicates.to_parquet(metrics / "replicates.parquet", index=False)
    effects = main_effects(configs, replicates, CONFIDENCE)
    effects.to_parquet(metrics / "effects.parquet", index=False)
    best_versus_others(configs, replicates, CONFIDENCE).to_parquet(
        metrics / "differences.parquet", index=False
    )


@pytest.fixture(scope="module")
def reported(evaluated_output, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "out"
    shutil.copytree(evaluated_output["out"], out)
    configs, replicates = synthetic_tables()
    write_tables(out, configs, replicates)
    record = RunRecord.from_json((out / "run.json").read_bytes())
    second = dataclasses.replace(record.model, ref=MODELS[1], identity="sha256:" + "5" * 64)
    adapter = AdapterSource(ADAPTER, "purple", "lora.safetensors", None, "sha256:" + "7" * 64)
    record = dataclasses.replace(record, models=(record.model, second), adapters=(adapter,))
    (out / "run.json").write_bytes(record.to_json())
    write_report([str(out)])
    markdown = (out / "report" / "report.md").read_text()
    return {"out": out, "configs": configs, "replicates": replicates, "markdown": markdown}


def name_of(row) -> str:
    return (
        row["model"]
        if pd.isna(row["lora"])
        else f"{row['model']} + {row['lora']} at {row['lora_scale']:g}"
    )


def drawn_of(replicates: pd.DataFrame, config_ids, column: str) -> np.ndarray:
    """(replicate, configuration) values of `column`, columns in the order of `config_ids`."""
    wide = replicates.pivot(index="replicate", columns="config_id", values=column)
    return wide[list(config_ids)].to_numpy()


def interval(metric, estimate: float, drawn: np.ndarray, confidence: float) -> tuple[float, float]:
    """The metric's interval straight from its definition: percentiles, or estimate +- z SD."""
    if metric is FID:
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * np.std(drawn, ddof=1)
        return estimate - half, estimate + half
    return tuple(np.quantile(drawn, [(1 - confidence) / 2, (1 + confidence) / 2]))


def ranged(value: float, low: float, high: float, digits: int) -> str:
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def expected_versus(configs, replicates, baseline: str) -> dict[tuple[str, str], dict]:
    """Per (model or adapter, metric): its mean minus the baseline's over the configurations
    with the same scheduler, steps and guidance, and the Bonferroni-adjusted paired interval."""
    names = configs.apply(name_of, axis=1)
    others = [n for n in dict.fromkeys(names) if n != baseline]
    level = 1 - (1 - CONFIDENCE) / len(others)
    base = configs[names == baseline].set_index(SAMPLING)["config_id"]
    expected = {}
    for name, metric in itertools.product(others, METRICS):
        column = metric.headline.column
        mine = configs[names == name].set_index(SAMPLING)["config_id"]
        matched = base.loc[mine.index]
        estimates = configs.set_index("config_id")[column]
        difference = estimates[mine].mean() - estimates[matched].mean()
        drawn = (drawn_of(replicates, mine, column) - drawn_of(replicates, matched, column)).mean(
            axis=1
        )
        low, high = interval(metric, difference, drawn, level)
        better = low > 0 if metric.higher_is_better else high < 0
        worse = high < 0 if metric.higher_is_better else low > 0
        verdict = (
            "clearly better" if better else "clearly worse" if worse else "no clear difference"
        )
        expected[name, metric.name] = {
            "text": ranged(difference, low, high, metric.headline.digits),
            "verdict": verdict, "value": estimates[mine].mean(),
            "baseline": estimates[matched].mean(), "configs": len(mine),
        }  # fmt: skip
    return expected


def test_each_model_and_adapter_against_the_baseline_with_paired_intervals(reported):
    configs, replicates, markdown = (reported[k] for k in ("configs", "replicates", "markdown"))
    expected = expected_versus(configs, replicates, MODELS[0])  # default: first, no adapter
    assert len(expected) == 7 * len(METRICS)
    # the data were made so that every verdict occurs
    assert {e["verdict"] for e in expected.values()} == {
        "clearly better", "clearly worse", "no clear difference",
    }  # fmt: skip
    headings = re.findall(r"^## (.*)$", markdown, re.M)
    assert headings[:3] == ["Recommendation: test", "Models and adapters: test",
                            "Best by each metric: test"]  # fmt: skip
    section = markdown.split("## Models and adapters: test")[1].split("\n## ")[0]
    for name in dict.fromkeys(n for n, _ in expected):
        words = "; ".join(
            f"{m.label} {expected[name, m.name]['verdict']}, {expected[name, m.name]['text']}"
            for m in METRICS
            if (name, m.name) in expected
        )
        assert f"- **{name}** vs the baseline: {words}." in section
        # the table: means over the compared configurations, the difference, the verdict
        (row,) = [line for line in section.splitlines() if line.startswith(f"| {name} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "4"  # configurations compared: 2 schedulers x 2 guidance scales
        for i, metric in enumerate(METRICS):
            e, digits = expected[name, metric.name], metric.headline.digits
            assert cells[2 + 4 * i : 6 + 4 * i] == [
                f"{e['value']:.{digits}f}", f"{e['baseline']:.{digits}f}", e["text"], e["verdict"],
            ]  # fmt: skip
    assert f"Baseline: **{MODELS[0]}**" in section
    assert "(Bonferroni, each at 99.29%)" in section  # 7 comparisons at 95% together


def test_baseline_named_by_the_spec(reported):
    run = load_run(str(reported["out"]))
    assert run.baseline == MODELS[0]
    run.baseline = baseline_of(run.configs, (MODELS[1], ADAPTER, 0.5))
    assert run.baseline == f"{MODELS[1]} + {ADAPTER} at 0.5"
    # a baseline the run does not have: the default
    assert baseline_of(run.configs, ("other", None, None)) == MODELS[0]
    section = models_and_adapters(run)
    expected = expected_versus(reported["configs"], reported["replicates"], run.baseline)
    table = section.table.set_index("model / adapter")
    assert list(table.index) == list(dict.fromkeys(n for n, _ in expected))
    for (name, metric_name), e in expected.items():
        label = {m.name: m.label for m in METRICS}[metric_name]
        assert table.loc[name, f"{label}: difference"] == e["text"]
        assert table.loc[name, f"{label}: verdict"] == e["verdict"]


def test_main_effects_over_model_adapter_and_scale(reported):
    configs, replicates, markdown = (reported[k] for k in ("configs", "replicates", "markdown"))
    effects = pd.read_parquet(reported["out"] / "metrics" / "effects.parquet")
    assert list(dict.fromkeys(effects["axis"])) == [
        "model", "lora", "lora_scale", "scheduler", "guidance_scale",
    ]  # fmt: skip
    values = {
        "model": configs["model"],
        "lora": configs["lora"].fillna("none"),
        "lora_scale": configs["lora_scale"].map(lambda s: "none" if pd.isna(s) else str(s)),
    }
    levels = {"model": list(MODELS), "lora": ["none", ADAPTER],
              "lora_scale": ["none", *map(str, SCALES)]}  # fmt: skip
    for axis, metric in itertools.product(levels, METRICS):
        column = metric.headline.column
        rows = effects[(effects["axis"] == axis) & (effects["column"] == column)]
        assert list(rows["level"]) == levels[axis]
        estimates = configs.set_index("config_id")[column]
        first_ids = configs.loc[values[axis] == levels[axis][0], "config_id"]
        first = drawn_of(replicates, first_ids, column).mean(axis=1)
        adjusted = 1 - (1 - CONFIDENCE) / (len(levels[axis]) - 1)
        for level in levels[axis][1:]:
            ids = configs.loc[values[axis] == level, "config_id"]
            r = rows[rows["level"] == level].iloc[0]
            mean = estimates[ids].mean()
            assert r["mean"] == pytest.approx(mean)
            assert (r["low"], r["high"]) == pytest.approx(
                interval(metric, mean, drawn_of(replicates, ids, column).mean(axis=1), CONFIDENCE)
            )
            difference = mean - estimates[first_ids].mean()
            drawn = drawn_of(replicates, ids, column).mean(axis=1) - first
            low, high = interval(metric, difference, drawn, adjusted)
            assert (r["difference"], r["difference_low"], r["difference_high"]) == pytest.approx(
                (difference, low, high)
            )
            # the report's main-effects table names the axis as a user would
            axis_name = {"model": "model", "lora": "adapter", "lora_scale": "adapter scale"}[axis]
            shown = f"{float(level):g}" if axis == "lora_scale" else level
            text = ranged(difference, low, high, metric.headline.digits)
            assert re.search(rf"^\| {re.escape(axis_name)} \| {re.escape(shown)} \|.*"
                             rf"{re.escape(text)}", markdown, re.M)  # fmt: skip


@pytest.mark.parametrize("metric", [ATTRIBUTE_ACCURACY, CLIP_SCORE], ids=lambda m: m.name)
def test_metric_vs_adapter_scale(reported, metric):
    configs, replicates = reported["configs"], reported["replicates"]
    run = load_run(str(reported["out"]))
    fig = scale_figure([run], metric)
    (ax,) = fig.axes
    column = metric.headline.column
    estimates = configs.set_index("config_id")[column]
    lines = [line for line in ax.lines if not line.get_label().startswith("_")]
    adapted = [line for line in lines if line.get_linestyle() != ":"]
    plain = [line for line in lines if line.get_linestyle() == ":"]
    assert [line.get_label() for line in adapted] == [f"{m} + {ADAPTER}" for m in MODELS]
    assert [line.get_label() for line in plain] == [f"{m}, no adapter" for m in MODELS]
    for model, line, container, flat in zip(MODELS, adapted, ax.containers, plain, strict=True):
        means, bounds = [], []
        for scale in SCALES:
            ids = configs.loc[(configs["model"] == model) & (configs["lora_scale"] == scale),
                              "config_id"]  # fmt: skip
            means.append(estimates[ids].mean())
            drawn = drawn_of(replicates, ids, column).mean(axis=1)
            bounds.append(interval(metric, means[-1], drawn, CONFIDENCE))
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), means)
        xs = np.asarray(line.get_xdata(), float)
        np.testing.assert_allclose(xs, SCALES, atol=0.05)  # shifted a little sideways
        segments = container.lines[2][0].get_segments()
        np.testing.assert_allclose([(s[0][1], s[1][1]) for s in segments], bounds)
        without = configs.loc[(configs["model"] == model) & configs["lora"].isna(), "config_id"]
        assert flat.get_ydata()[0] == pytest.approx(estimates[without].mean())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "0.5", "1"]


def test_every_plot_and_table_splits_by_model(reported):
    out, configs, markdown = reported["out"], reported["configs"], reported["markdown"]
    names = configs.apply(name_of, axis=1)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    for metric in METRICS:
        assert f"{metric.name}_vs_lora_scale.png" in figures
        assert f"{metric.name}_effects.png" in figures
    assert (out / "report" / "attribute_accuracy_vs_lora_scale.png").exists()
    # the recommendation names a model or adapter with each configuration it picks
    recommendation = markdown.split("## Recommendation: test")[1].split("\n## ")[0]
    picks = re.findall(r"\*\*([^*]+)\*\*", recommendation)
    assert picks and all(any(p.startswith(f"{n}, ") for n in names) for p in picks)
    # every configuration, with its model, adapter and scale
    table = markdown.split("## All configurations: test")[1].split("\n## ")[0]
    header, _, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert header.startswith("| configuration | model | adapter | adapter scale | scheduler |")
    cells = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[1:4] for row in rows}
    for _, c in configs.iterrows():
        scale = "none" if pd.isna(c["lora_scale"]) else f"{c['lora_scale']:g}"
        adapter = "none" if pd.isna(c["lora"]) else c["lora"]
        assert cells[c["config_id"]] == [c["model"], adapter, scale]


def test_vs_guidance_and_tradeoff_split_by_model(reported):
    configs = reported["configs"]
    run = load_run(str(reported["out"]))
    fig = versus_figure([run], CLIP_SCORE, "guidance_scale")
    names = list(dict.fromkeys(configs.apply(name_of, axis=1)))
    # 8 models and adapters x 2 schedulers: a panel per scheduler, a line per model and adapter
    assert [ax.get_title() for ax in fig.axes] == list(SCHEDULERS)
    for ax, scheduler in zip(fig.axes, SCHEDULERS, strict=True):
        lines = [line for line in ax.lines if not line.get_label().startswith("_")]
        assert [line.get_label() for line in lines] == [f"{n}, 2 steps" for n in names]
        for name, line in zip(names, lines, strict=True):
            mine = configs[(configs.apply(name_of, axis=1) == name)
                           & (configs["scheduler"] == scheduler)]  # fmt: skip
            np.testing.assert_allclose(
                np.asarray(line.get_ydata(), float),
                mine.sort_values("guidance_scale")["clip_score"],
            )
    # the trade-off's key names each model and adapter by a tag, the legend the tag in full
    fig = tradeoff_figure([run])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[2:] == [f"m{k} = {n}" for k, n in enumerate(names, 1)]
    key = "\n".join(t.get_text() for t in fig.axes[1].texts)
    for k, name in enumerate(names, 1):
        for _, c in configs[configs.apply(name_of, axis=1) == name].iterrows():
            line = rf"^ *\d+ m{k} {c['scheduler']} s2 g{c['guidance_scale']:g}( \*)?$"
            assert re.search(line, key, re.M)


def test_one_model_without_adapters_reports_as_before(evaluated_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    configs, replicates = synthetic_tables()
    plain = configs[(configs["model"] == MODELS[0]) & configs["lora"].isna()]
    write_tables(out, plain, replicates[replicates["config_id"].isin(plain["config_id"])])
    write_report([str(out)])
    markdown = (out / "report" / "report.md").read_text()
    assert "Models and adapters" not in markdown and "_vs_lora_scale.png" not in markdown
    assert "| configuration | scheduler |" in markdown
    assert "**ddim, 2 steps, guidance" in markdown  # configurations named as before


def test_two_runs_compare_the_same_model_and_configuration(reported, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(reported["out"], a)
    shutil.copytree(reported["out"], b)
    configs, replicates = reported["configs"], reported["replicates"]
    # B: the adapter's CLIP score 1 higher at every scale; the models alone unchanged
    shift = configs["lora"].notna().astype(float)
    shifted = configs.assign(**{c: configs[c] + shift for c in
                                ("clip_score", "clip_score_low", "clip_score_high")})  # fmt: skip
    moved = replicates["config_id"].map(configs.set_index("config_id")["lora"].notna())
    write_tables(b, shifted, replicates.assign(clip_score=replicates["clip_score"] + moved))
    write_report([str(a), str(b)])
    markdown = (a / "report" / "vs-b" / "report.md").read_text()
    section = markdown.split("## Comparison: a vs b")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and " steps, " in line]
    assert len(rows) == len(configs)  # each configuration with its own counterpart only
    for _, c in configs.iterrows():
        label = f"{name_of(c)}, {c['scheduler']}, 2 steps, guidance {c['guidance_scale']:g}"
        (row,) = [r for r in rows if r.startswith(f"| {label} |")]
        change = "+1.00 [+1.00, +1.00]" if pd.notna(c["lora"]) else "+0.00 [+0.00, +0.00]"
        assert f"| {change} |" in row


def test_provenance_names_every_model_and_adapter_with_its_identity(reported):
    (line,) = [x for x in reported["markdown"].splitlines() if x.startswith("- Output `")]
    record = RunRecord.from_json((reported["out"] / "run.json").read_bytes())
    for source in (*record.models, *record.adapters):
        assert f"`{source.ref}` ({source.identity})" in line, line
    assert line.count("`builtin:tiny`") == 1 and "models " in line
