"""The safety checker on a real Ray: per-image flags in the dataset, flagged images as the checker
made them, what eval counts (suite `safety: exclude | include`), and the report's counts.

The model is builtin:tiny with a tiny real `StableDiffusionSafetyChecker` whose concept thresholds
decide what it flags: all 17 concepts are one direction, so an image is flagged exactly when the
cosine between its embedding and that direction exceeds the threshold (> 1: never).
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from conftest import PROMPTS, job, suite_data
from PIL import Image

from sdbatch.builtin import builtin_path
from sdbatch.evaluation.metric_math import FeatureStats, FrechetReference, fid
from sdbatch.evaluation.reference import load_stats
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.shards import read_npz
from sdbatch.evaluation.suite import parse_suite
from sdbatch.generation import generate
from sdbatch.reporting.write import write_report
from sdbatch.spec import parse_spec
from sdbatch.toy.components import save_sd_pipeline
from sdbatch.toy.world import write_reference

KEY = ["prompt_id", "sample_index", "config_id"]
NEVER = 2.0  # a cosine is at most 1
NEWER_FIELDS = ("bytes", "sha256", "run")  # of a done marker, since sdbatch 0.1


def build_checked_model(destination, threshold: float):
    """Save builtin:tiny with a tiny safety checker at `threshold`; returns the checker and its
    feature extractor (the same weights for every threshold)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    tower["num_attention_heads"] = 4
    config = CLIPConfig(
        text_config=tower,
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.concept_embeds.data[:] = torch.randn(config.projection_dim)
    checker.concept_embeds_weights.data[:] = threshold
    # never "special care": it would lower every concept threshold by 0.01
    checker.special_care_embeds_weights.data[:] = NEVER
    extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    tiny = StableDiffusionPipeline.from_pretrained(builtin_path("tiny"))
    save_sd_pipeline(
        destination, tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.unet, checker, extractor
    )
    return checker, extractor


def concept_cosines(checker, extractor, rows: list[dict]) -> np.ndarray:
    """What the checker compares with its thresholds, computed from stored (unflagged) PNGs."""
    images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in rows]
    with torch.no_grad():
        clip_input = extractor(images, return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        cosines = torch.nn.functional.cosine_similarity(embeds, checker.concept_embeds[:1])
    return cosines.numpy()


def read(output) -> list[dict]:
    rows = pads.dataset(str(output / "images")).to_table().to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in KEY))


def pixels(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))


@pytest.fixture(scope="module")
def flagged(tmp_path_factory, ray_address):
    """The same sweep from the model with a checker that never flags, and with a threshold that
    flags about half of the images (chosen from the first run's cosines)."""
    root = tmp_path_factory.mktemp("safety")
    prompts = root / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS[:4]}), prompts)
    sweep = {"scheduler": ["euler"], "guidance_scale": [1.0, 7.5]}

    def run(name: str):
        data = job(prompts, name=name, model=str(root / name), sweep=sweep)
        return generate(parse_spec(data), output=str(root / f"out-{name}"), address=ray_address)

    checker, extractor = build_checked_model(root / "never", NEVER)
    run("never")
    cosines = concept_cosines(checker, extractor, read(root / "out-never"))
    # The checker rounds (cosine - threshold) to 3 decimals: put the threshold in the middle of
    # the widest gap between the middle cosines, well clear of that rounding.
    ordered = np.sort(cosines)
    middle = range(len(ordered) // 4, 3 * len(ordered) // 4 + 1)
    split = max(middle, key=lambda i: ordered[i] - ordered[i - 1])
    assert ordered[split] - ordered[split - 1] > 0.004
    threshold = float(ordered[split - 1] + ordered[split]) / 2
    build_checked_model(root / "some", threshold)
    summary = run("some")
    return {
        "root": root,
        "never": root / "out-never",
        "out": root / "out-some",
        "summary": summary,
        "expected": cosines > threshold,
    }


def test_flags_are_recorded_and_flagged_images_are_what_the_checker_made(flagged):
    never, some = read(flagged["never"]), read(flagged["out"])
    assert [r["nsfw_flagged"] for r in never] == [False] * len(never)  # checked, none flagged
    flags = np.array([r["nsfw_flagged"] for r in some])
    assert flags.tolist() == flagged["expected"].tolist()
    per_config = pd.Series(flags).groupby([r["config_id"] for r in some]).agg(["sum", "size"])
    assert ((per_config["sum"] >= 1) & (per_config["size"] - per_config["sum"] >= 2)).all()
    for before, after in zip(never, some, strict=True):
        assert [before[k] for k in KEY] == [after[k] for k in KEY]
        if after["nsfw_flagged"]:
            assert not pixels(after).any()  # black, as diffusers' checker returns it
        else:
            assert after["image"]["bytes"] == before["image"]["bytes"]
    # counted in the unit markers, the summary and the run's history
    markers = [json.loads(p.read_text()) for p in (flagged["out"] / "_units").glob("*.json")]
    assert sum(m["nsfw_flagged"] for m in markers) == flags.sum() == flagged["summary"].flagged
    run = json.loads((flagged["out"] / "run.json").read_text())
    assert run["history"][-1]["nsfw_flagged"] == flags.sum()


@pytest.fixture(scope="module")
def evaluated(flagged, ray_address):
    """The flagged output evaluated with `safety: include`, then with the default (exclude)."""
    root = flagged["root"]
    write_reference(str(root / "reference.parquet"), count=40, size=32)
    data = suite_data(root / "reference.parquet", root / "cache")
    include = evaluate(
        str(flagged["out"]), parse_suite({**data, "safety": "include"}), address=ray_address
    )
    shards = {p: p.stat().st_mtime_ns for p in (flagged["out"] / "metrics").rglob("*.npz")}
    exclude = evaluate(str(flagged["out"]), parse_suite(data), address=ray_address)
    return {"include": include.configs, "exclude": exclude.configs, "shards": shards}


def test_eval_excludes_flagged_images_by_default(flagged, evaluated):
    out = flagged["out"]
    # switching the policy extracted nothing again: flagged images are filtered at the merge
    after = {p: p.stat().st_mtime_ns for p in (out / "metrics").rglob("*.npz")}
    assert after == evaluated["shards"]

    per_image = pd.read_parquet(out / "metrics" / "images.parquet")
    dataset = pq.read_table(out / "images", columns=[*KEY, "nsfw_flagged"]).to_pandas()
    joined = dataset.merge(per_image, on=KEY, suffixes=("", "_eval"), validate="one_to_one")
    assert len(joined) == len(dataset)
    assert (joined["nsfw_flagged"] == joined["nsfw_flagged_eval"]).all()
    flags = joined.groupby("config_id")["nsfw_flagged"].sum()

    exclude = evaluated["exclude"].set_index("config_id")
    include = evaluated["include"].set_index("config_id")
    assert (exclude["n_flagged"] == flags[exclude.index]).all()
    assert (include["n_flagged"] == flags[include.index]).all()
    assert (exclude["n_excluded"] == exclude["n_flagged"]).all()
    assert (include["n_excluded"] == 0).all()
    assert (exclude["n_images"] == include["n_images"]).all()

    unflagged = joined[~joined["nsfw_flagged"]]
    expected = unflagged.groupby("config_id")["clip_score"].mean()
    assert np.allclose(exclude["clip_score"], expected[exclude.index])
    everything = joined.groupby("config_id")["clip_score"].mean()
    assert np.allclose(include["clip_score"], everything[include.index])
    assert not np.allclose(exclude["clip_score"], include["clip_score"])

    # FID from the merged statistics equals FID over the kept images' features, in one pass
    record = json.loads((out / "metrics" / "metrics.json").read_text())
    reference = load_stats(record["reference"]["cache"])
    gauss = FrechetReference(reference.mu, reference.sigma)
    shards = [read_npz(str(p)) for p in (out / "metrics" / "_shards").rglob("*.npz")]
    features = np.concatenate([s["features"] for s in shards])
    keys = pd.concat([pd.DataFrame({k: s[k] for k in KEY}) for s in shards], ignore_index=True)
    keys = keys.merge(dataset, on=KEY, how="left")  # keeps the shards' order
    for config_id in exclude.index:
        kept = features[((keys["config_id"] == config_id) & ~keys["nsfw_flagged"]).to_numpy()]
        assert len(kept) == exclude.loc[config_id, "n_images"] - flags[config_id]
        assert exclude.loc[config_id, "fid"] == pytest.approx(
            fid(FeatureStats.of(kept), gauss), rel=1e-6
        )
    assert not np.allclose(exclude["fid"], include["fid"])

    assert record["suite"]["safety"] == "exclude"
    assert record["flagged_images"] == record["excluded_images"] == flags.sum()


def test_outputs_made_before_the_flag_evaluate_as_if_unchecked(flagged, evaluated, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(flagged["out"], out)
    # as sdbatch 0.1 wrote them: no nsfw_flagged column, and markers without size or hash
    for path in (out / "images").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["nsfw_flagged"]), path)
    for path in (out / "_units").glob("*.json"):
        marker = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in marker.items() if k not in NEWER_FIELDS}))
    data = suite_data(flagged["root"] / "reference.parquet", flagged["root"] / "cache")
    configs = evaluate(str(out), parse_suite(data)).configs.set_index("config_id")
    assert configs["n_flagged"].isna().all() and (configs["n_excluded"] == 0).all()
    include = evaluated["include"].set_index("config_id")
    assert np.allclose(configs["clip_score"], include.loc[configs.index, "clip_score"])
    assert np.allclose(configs["fid"], include.loc[configs.index, "fid"])


def test_report_shows_flagged_counts_and_that_they_were_excluded(flagged, evaluated):
    write_report([str(flagged["out"])])
    markdown = (flagged["out"] / "report" / "report.md").read_text()
    configs = evaluated["exclude"]
    total = int(configs["n_flagged"].sum())
    assert f"safety checker flagged {total} of {int(configs['n_images'].sum())} images" in markdown
    assert "**excluded from** every metric (suite `safety: exclude`)" in markdown
    assert "| images | flagged (excluded) |" in markdown
    for _, row in configs.iterrows():
        assert f"| {row['n_images']} | {row['n_flagged']} |" in markdown
