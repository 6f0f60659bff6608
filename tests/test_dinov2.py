"""FD-DINOv2 (`fid.features: dinov2`): the tiny builtin DINOv2, features equal to plain
transformers and to Stein et al.'s preprocessing, an evaluation's distance equal to one computed
from independently extracted features, and a bad model refused in one line before any work."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import suite_data
from PIL import Image

from sdbatch.builtin import builtin_path
from sdbatch.digests import folder_digest
from sdbatch.errors import InputError
from sdbatch.evaluation.extractors import FidSettings, build_extractor, describe_extractor
from sdbatch.evaluation.metric_math import frechet_distance
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.reporting.write import write_report
from sdbatch.toy.build import build_tiny_dinov2

TINY = builtin_path("tiny-dinov2")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def some_images() -> list[np.ndarray]:
    """Noise of three sizes: square, as generated, and not, as a reference may be."""
    rng = np.random.default_rng(0)
    shapes = [(48, 48), (48, 48), (64, 40), (33, 70)]
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


def dgm_eval_features(images: list[np.ndarray]) -> np.ndarray:
    """Stein et al.'s dgm-eval, written out: PIL bicubic resize of the whole image to the input
    size, ImageNet mean and std, the CLS token after the final layernorm."""
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(TINY).eval()
    side = model.config.image_size
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    resized = [np.asarray(Image.fromarray(i).resize((side, side), Image.BICUBIC)) for i in images]
    pixels = ((np.stack(resized) / 255 - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels).float(), output_hidden_states=True)
        return model.layernorm(out.hidden_states[-1][:, 0]).double().numpy()


def test_the_tiny_dinov2_is_safetensors_rebuilt_identically_and_loads_offline(tmp_path):
    import huggingface_hub
    from transformers import AutoImageProcessor, Dinov2Model

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: nothing may come from the hub
    assert {p.suffix for p in TINY.iterdir()} == {".json", ".safetensors"}
    model = Dinov2Model.from_pretrained(TINY, use_safetensors=True)
    processor = AutoImageProcessor.from_pretrained(TINY, backend="pil")
    assert model.config.model_type == "dinov2" and model.config.hidden_size == 32
    assert type(processor).__name__ == "BitImageProcessorPil"  # as facebook/dinov2-* load
    # fixed random weights: the builder writes the shipped files again, byte for byte
    build_tiny_dinov2(tmp_path / "again")
    assert folder_digest(tmp_path / "again") == folder_digest(TINY)


def test_features_equal_plain_transformers_and_stein_et_al_preprocessing():
    from transformers import AutoImageProcessor, Dinov2Model

    info = describe_extractor(FidSettings(features="dinov2", model="builtin:tiny-dinov2"), None)
    assert (info.name, info.dim, info.resize) == ("dinov2", 32, "pil-bicubic-32x32")
    assert info.weights == folder_digest(TINY) and info.distance == "FD-DINOv2"
    images = some_images()
    features = build_extractor(info, "cpu", None)(images, None)

    model = Dinov2Model.from_pretrained(TINY).eval()
    processor = AutoImageProcessor.from_pretrained(TINY)
    whole = {"size": {"height": 32, "width": 32}, "do_center_crop": False}
    with torch.no_grad():
        plain = model(**processor(images=images, return_tensors="pt", **whole)).pooler_output
    assert np.allclose(features, plain.double().numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(features, dgm_eval_features(images), rtol=1e-4, atol=1e-5)
    # the processor's default crops the border away: a different feature, which would show
    with torch.no_grad():
        cropped = model(**processor(images=images, return_tensors="pt")).pooler_output
    assert not np.allclose(features, cropped.double().numpy(), rtol=1e-2, atol=1e-3)
    assert features.std(axis=0).min() > 1e-3  # the random weights tell images apart


def test_the_default_model_is_pinned_and_loaded_from_the_offline_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    repo = tmp_path / "hub" / "models--facebook--dinov2-large"
    shutil.copytree(TINY, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = describe_extractor(FidSettings(features="dinov2"), None)
    assert info.weights == f"hub:facebook/dinov2-large@{COMMIT}"
    assert info.model.revision == COMMIT
    images = some_images()
    features = build_extractor(info, "cpu", None)(images, None)
    assert np.allclose(features, dgm_eval_features(images), rtol=1e-4, atol=1e-5)


def test_an_evaluation_writes_the_frechet_distance_of_dinov2_features(
    evaluated_output, tmp_path, ray_address
):
    """All the way from pixels, on actors, against features extracted here in one pass."""
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out, ignore=shutil.ignore_patterns("metrics"))
    data = suite_data(evaluated_output["reference"], tmp_path / "cache", metrics=["fid"])
    data["fid"] = {"features": "dinov2", "model": "builtin:tiny-dinov2"}
    configs = evaluate(str(out), parse_suite(data), address=ray_address).configs
    configs = configs.set_index("config_id")

    reference = pq.read_table(evaluated_output["reference"])["image"].to_pylist()
    ref = dgm_eval_features([decode(b["bytes"]) for b in reference])
    images = pq.read_table(out / "images").to_pandas()
    assert len(configs) == images["config_id"].nunique() == 4
    for config_id, rows in images.groupby("config_id"):
        x = dgm_eval_features([decode(b["bytes"]) for b in rows["image"]])
        expected = frechet_distance(
            x.mean(0), np.cov(x, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False)
        )
        assert configs.loc[config_id, "fid"] == pytest.approx(expected, rel=1e-4)

    extractor = json.loads((out / "metrics" / "metrics.json").read_text())["extractor"]
    assert (extractor["name"], extractor["dim"]) == ("dinov2", 32)
    assert extractor["weights"] == folder_digest(TINY)
    assert extractor["resize"] == "pil-bicubic-32x32"
    assert extractor["model"]["ref"] == "builtin:tiny-dinov2"
    write_report([str(out)])
    markdown = (out / "report" / "report.md").read_text()
    assert f"FD-DINOv2 features: `dinov2`, 32-d, weights {folder_digest(TINY)}" in markdown


def _without(name: str):
    def make(tmp_path: Path) -> str:
        folder = tmp_path / "dinov2"
        shutil.copytree(TINY, folder)
        (folder / name).unlink()
        return str(folder)

    return make


def _pickled(tmp_path: Path) -> str:
    from safetensors.torch import load_file

    folder = Path(_without("model.safetensors")(tmp_path))
    torch.save(load_file(TINY / "model.safetensors"), folder / "pytorch_model.bin")
    return str(folder)


BAD_MODELS = {
    "missing": (lambda t: str(t / "nothing"), "fid.model: no folder '{tmp}/nothing', and it is"),
    "not-cached": (lambda t: "sdbatch/no-dinov2", "fid.model: cannot find 'sdbatch/no-dinov2' on"),
    "pickled": (_pickled, "fid.model: {tmp}/dinov2 has no .safetensors weights, and unpickling"),
    "no-processor": (
        _without("preprocessor_config.json"),
        "fid.model: cannot read {tmp}/dinov2's preprocessor_config.json (",
    ),
    "a-pipeline": (lambda t: "builtin:tiny", "fid.model: cannot read builtin:tiny's config.json"),
    "clip": (lambda t: "builtin:tiny-clip", "fid.model: builtin:tiny-clip holds a 'clip' model"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_bad_dinov2_model_is_one_line_before_any_work(case, tmp_path, refused):
    """Through `sdbatch reference`: one short line, quickly, before Ray (the fixture checks),
    with nothing written to the cache."""
    make, message = BAD_MODELS[case]
    np.savez(tmp_path / "ref.npz", mu=np.zeros(32), sigma=np.eye(32))
    suite = {
        "name": "dinov2",
        "metrics": ["fid"],
        "fid": {"features": "dinov2", "model": make(tmp_path)},
        "reference": {"stats": "ref.npz"},
        "cache": str(tmp_path / "cache"),
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert message.format(tmp=tmp_path) in refused("reference", path)
    assert not (tmp_path / "cache").exists()


def test_a_dinov2_model_with_other_features_is_refused():
    with pytest.raises(InputError, match=r"^fid\.model: names the DINOv2 model of features: "):
        parse_suite({"name": "x", "metrics": ["fid"], "fid": {"features": "clip", "model": "m"}})
