"""The report's image galleries: PNGs that fit the page with labels a reader can read, the prompts
a user asks for, the worst images of the best configurations, and every image of one prompt."""

from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdbatch.errors import InputError
from sdbatch.evaluation.registry import REGISTRY
from sdbatch.reporting.grids import choose_prompts, table_png, worst_images
from sdbatch.reporting.runs import load_run
from sdbatch.reporting.write import write_report

CONFIGS, SAMPLES = 4, 2  # conftest's job: 2 schedulers x 2 guidance scales, 2 images per prompt


def prompt_ids(out) -> list[str]:
    return sorted(
        pq.read_table(out / "images", columns=["prompt_id"])["prompt_id"].unique().to_pylist()
    )


def colorful(png) -> np.ndarray:
    """Where a PNG shows generated images: labels are black on white, gray where anti-aliased."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return pixels.std(axis=2) > 20


def runs(mask: np.ndarray) -> int:
    """How many separate stretches of True."""
    return int(np.count_nonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])) == 1))


def titles(markdown: str, gallery: str) -> list[str]:
    """The figure titles under a gallery's heading in report.md."""
    part = markdown.split(f"## {gallery}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\*\*(.+)\*\*$", part, flags=re.M)


@pytest.fixture
def output(evaluated_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    return out


@pytest.fixture(scope="module")
def reported(evaluated_output, tmp_path_factory):
    """The report of a copy of the evaluated output, with 3 prompts and one prompt's every image."""
    out = tmp_path_factory.mktemp("images") / "out"
    shutil.copytree(evaluated_output["out"], out)
    ids = prompt_ids(out)
    write_report(str(out), prompts=3, prompt=ids[1])
    return out, ids


def test_gallery_pngs_fit_the_page_with_labels_of_real_text(reported):
    out, _ = reported
    pngs = [*sorted(out.glob("report/grid-*.png")), out / "report" / "prompt.png"]
    pngs += sorted(out.glob("report/worst-*.png"))
    assert len(pngs) == 3 + 1 + 1  # 3 prompts, one prompt's view, CLIP score's worst images
    for png in pngs:
        pixels = np.asarray(Image.open(png).convert("L"))
        assert pixels.shape[1] <= 1100, png.name  # shown at its size on the 1100 px page
        # the column headers: dark pixels above the first image
        first_image = np.flatnonzero(colorful(png).any(axis=1))[0]
        dark = np.flatnonzero((pixels[:first_image] < 100).any(axis=1))
        assert len(dark), png.name
        assert dark[-1] - dark[0] + 1 >= 12, png.name  # a line of text from ascender to descender


def test_a_count_spreads_the_prompts_from_first_to_last(reported):
    out, ids = reported
    shown = titles((out / "report" / "report.md").read_text(), "Images (same seed")
    assert [t.split(":")[0] for t in shown] == [ids[0], ids[len(ids) // 2], ids[-1]]
    assert choose_prompts(list("abcdefghij"), 4, "run") == ["a", "d", "g", "j"]
    assert choose_prompts(list("abc"), 5, "run") == ["a", "b", "c"]


def test_listed_prompt_ids_are_shown_in_their_order(output):
    ids = prompt_ids(output)
    write_report(str(output), prompts=[ids[4], ids[0]])
    markdown = (output / "report" / "report.md").read_text()
    shown = titles(markdown, "Images (same seed")
    assert [t.split(":")[0] for t in shown] == [ids[4], ids[0]]
    assert "2 of 7 prompts, as listed" in markdown


def test_unknown_prompt_ids_are_refused_before_any_image_is_decoded(output, monkeypatch, refused):
    ids = prompt_ids(output)

    def decoded(*args, **kwargs):
        raise AssertionError("an image was decoded before the prompt ids were checked")

    monkeypatch.setattr(Image, "open", decoded)
    with pytest.raises(InputError, match=f"^--prompts: 'nope' .* e.g. {ids[0]}"):
        write_report(str(output), prompts=[ids[0], "nope"])
    with pytest.raises(InputError, match=r"^--prompt: 'nope' is not a prompt id"):
        write_report(str(output), prompt="nope")
    assert "--prompts: 'nope'" in refused("report", output, "--prompts", "nope")
    assert not (output / "report").exists()


def test_worst_images_are_the_lowest_scores_of_the_best_configuration(output):
    metrics = output / "metrics"
    configs = pd.read_parquet(metrics / "configs.parquet")
    best = configs.loc[configs["clip_score"].idxmax(), "config_id"]
    images = pd.read_parquet(metrics / "images.parquet")
    # the lowest score of all is another configuration's: it must not be shown
    images.loc[images.index[images["config_id"] != best][0], "clip_score"] = -10.0
    images.loc[images.index[images["config_id"] == best][3], "clip_score"] = -1.0
    images.to_parquet(metrics / "images.parquet")

    worst = worst_images(load_run(str(output)), REGISTRY["clip_score"])
    expected = images[images["config_id"] == best].sort_values("clip_score").head(8)
    assert worst["config_id"].eq(best).all()
    assert worst["score"].iloc[0] == -1.0
    assert list(zip(worst["prompt_id"], worst["sample_index"], strict=True)) == list(
        zip(expected["prompt_id"], expected["sample_index"], strict=True)
    )
    assert worst["score"].tolist() == expected["clip_score"].tolist()
    write_report(str(output))
    caption = titles((output / "report" / "report.md").read_text(), "Worst images")[0]
    assert caption.startswith("CLIP score, worst first") and f"({best})" in caption


def test_no_per_image_scores_no_worst_images(output):
    (output / "metrics" / "images.parquet").unlink()
    write_report(str(output))
    markdown = (output / "report" / "report.md").read_text()
    assert "## Worst images" not in markdown and "## Images (same seed" in markdown


def test_one_prompt_shows_every_configuration_and_sample(reported):
    out, ids = reported
    markdown = (out / "report" / "report.md").read_text()
    assert titles(markdown, "Every image of prompt")[0].startswith(f"{ids[1]}: ")
    cells = colorful(out / "report" / "prompt.png")
    assert runs(cells.any(axis=0)) == SAMPLES  # columns of images
    assert runs(cells.any(axis=1)) == CONFIGS  # rows of images


def test_columns_that_do_not_fit_wrap_into_bands():
    def png(color) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
        return buffer.getvalue()

    columns = [f"guidance {g}" for g in range(20)]
    cells = {(i, j): png((255, 40 * i, 10 * j)) for i in range(2) for j in range(20)}
    sheet = io.BytesIO(table_png(["ddim\n20 steps", "euler\n20 steps"], columns, cells))
    assert Image.open(sheet).width <= 1100
    shown = colorful(sheet)
    per_band, rows = runs(shown.any(axis=0)), runs(shown.any(axis=1))
    assert per_band < 20 and rows == 2 * -(-20 // per_band)  # every band has both rows
