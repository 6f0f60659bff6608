"""The shapes world for the image-conditioned tasks: object masks and depth maps consistent with
the rendered pixels, and the tasks' prompt files in jobs/."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image

from sdbatch.toy import world
from sdbatch.toy.world import SCENES, Scene, depth_map, judge, object_mask, place, render


def _decode(struct) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(struct["bytes"])))


def test_mask_is_exactly_where_the_image_differs_from_the_background():
    # PIL draws without antialiasing, so the match is exact, pixel for pixel.
    for scene in SCENES + world.PURPLE_SCENES:
        for seed in range(6):
            image = np.asarray(render(scene, seed))
            mask = object_mask(scene, seed)
            assert mask.mode == "L"
            drawn = (image != world.BACKGROUND).any(axis=2)
            assert np.array_equal(np.asarray(mask) == 255, drawn), (scene, seed)
            assert set(np.unique(np.asarray(mask))) == {0, 255}


def test_depth_is_the_silhouette_brighter_for_larger_objects():
    seen = []
    for scene in SCENES:
        for seed in range(6):
            depth = np.asarray(depth_map(scene, seed))
            inside = np.asarray(object_mask(scene, seed)) == 255
            assert (depth[~inside] == 0).all()
            values = np.unique(depth[inside])
            assert len(values) == 1 and values[0] > 0, (scene, seed, values)
            seen.append((place(scene, seed).radius, int(values[0]), scene.size))
    seen.sort()
    assert [v for _, v, _ in seen] == sorted(v for _, v, _ in seen)
    assert max(v for _, v, s in seen if s == "small") < min(v for _, v, s in seen if s == "large")


@pytest.mark.parametrize("task", world.TASKS)
def test_committed_prompt_files_are_what_the_cli_writes(tmp_path, task):
    path = tmp_path / f"{task}.parquet"
    world.main(["edits", str(path), "--task", task, "--count", "24"])
    fresh = pd.read_parquet(path)
    committed = pd.read_parquet(REPO / "jobs" / f"{task}-prompts.parquet")
    assert list(committed.columns) == [
        "prompt_id",
        "prompt",
        "image",
        "mask",
        "depth",
        "source_prompt",
    ]
    assert len(committed) == 24 and committed["prompt_id"].is_unique
    assert fresh.to_dict("records") == committed.to_dict("records")


@pytest.mark.parametrize("task", ["img2img", "depth2img", "inpaint"])
def test_edits_change_one_attribute_the_judge_sees(task):
    rows = pd.read_parquet(REPO / "jobs" / f"{task}-prompts.parquet")
    changed = "shape" if task == "inpaint" else "color"
    for _, row in rows.iterrows():
        source, target = Scene.parse(row["source_prompt"]), Scene.parse(row["prompt"])
        assert dataclasses.replace(source, **{changed: getattr(target, changed)}) == target
        assert getattr(source, changed) != getattr(target, changed)
        image = _decode(row["image"])
        assert all(dataclasses.astuple(judge(image, source)))
        verdict = dataclasses.asdict(judge(image, target))
        assert not verdict.pop(changed) and all(verdict.values()), row["prompt_id"]
        depth, mask = _decode(row["depth"]), _decode(row["mask"])
        assert np.array_equal(depth > 0, (image != world.BACKGROUND).any(axis=2))
        assert set(np.unique(mask)) == {0, 255}
        if task != "inpaint":
            assert np.array_equal(mask > 0, depth > 0)


def test_inpaint_masks_cover_both_shapes_in_whole_latent_cells():
    for i, edit in enumerate(world.edits("inpaint", 24)):
        mask = np.asarray(world.inpaint_mask(edit)) > 0
        for scene in (edit.source, edit.target):
            assert mask[np.asarray(object_mask(scene, edit.seed)) > 0].all(), i
        cells = mask.reshape(8, 4, 8, 4)
        assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()
        assert mask.mean() < 0.6  # the rest of the image is there to preserve


def test_outpaint_sources_are_the_left_of_the_scene_the_prompt_names():
    rows = pd.read_parquet(REPO / "jobs" / "outpaint-prompts.parquet")
    assert rows["mask"].isna().all() and rows["depth"].isna().all()
    assert rows["source_prompt"].isna().all()
    cut = 0
    for edit, (_, row) in zip(world.edits("outpaint", 24), rows.iterrows(), strict=True):
        whole = np.asarray(render(edit.target, edit.seed))
        assert row["prompt"] == edit.target.caption
        assert np.array_equal(_decode(row["image"]), whole[:, : world.OUTPAINT_KEEP])
        cut += bool((whole[:, world.OUTPAINT_KEEP :] != world.BACKGROUND).any())
    # Some objects reach into the strip to paint (the model must finish them), some do not.
    assert 0 < cut < len(rows)


def test_an_unknown_task_is_refused():
    with pytest.raises(SystemExit):
        world.main(["edits", "x.parquet", "--task", "colorize"])
    with pytest.raises(ValueError, match="task: 'colorize' is not one of img2img"):
        world.edits("colorize", 3)
