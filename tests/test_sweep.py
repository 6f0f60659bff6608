"""Configurations, seeds and work-unit planning."""

from __future__ import annotations

import dataclasses

import pandas as pd

from sdbatch.spec import Adapter, Sweep
from sdbatch.sweep import Config, configurations, image_seed, plan_units, split_unit


def prompts(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": [f"prompt {i}" for i in range(n)],
            "negative_prompt": pd.Series([None] * (n - 1) + ["own negative"], dtype=object),
        }
    )


SWEEP = Sweep(scheduler=("ddim", "euler"), num_inference_steps=(10, 25), guidance_scale=(1.0, 7.5))


def test_configurations_are_the_cartesian_product_in_spec_order():
    configs = configurations(SWEEP)
    assert len(configs) == 8
    assert [(c.scheduler, c.num_inference_steps, c.guidance_scale) for c in configs[:3]] == [
        ("ddim", 10, 1.0),
        ("ddim", 10, 7.5),
        ("ddim", 25, 1.0),
    ]
    assert len({c.config_id for c in configs}) == 8


def test_config_id_is_readable_stable_and_covers_every_field():
    config = Config("ddim", 25, 7.5, 512, 512, "")
    assert config.config_id.startswith("ddim-s25-g7.5-")
    assert config.config_id == Config("ddim", 25, 7.5, 512, 512, "").config_id
    for other in (
        Config("ddim", 25, 7.5, 512, 768, ""),
        Config("ddim", 25, 7.5, 512, 512, "blurry"),
    ):
        assert other.config_id != config.config_id


def test_seed_depends_on_prompt_and_sample_only():
    seeds = {image_seed(0, p, s) for p in ("a", "b") for s in range(3)}
    assert len(seeds) == 6
    assert image_seed(0, "a", 0) != image_seed(1, "a", 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_units_cover_every_pair_once_and_skip_done_ones():
    configs = configurations(SWEEP)
    table = prompts(5)
    units = plan_units(table, configs, images_per_prompt=2, seed=0, shard_size=2)
    assert len(units) == 3 * 8  # shards of 2, 2, 1 prompts for each configuration
    pairs = [(u.config.config_id, pid) for u in units for pid in u.prompt_ids]
    assert len(pairs) == len(set(pairs)) == 5 * 8
    assert sum(u.num_images for u in units) == 5 * 8 * 2
    # shards outermost: the first units hold every configuration for the first prompts
    assert {u.config.config_id for u in units[:8]} == {c.config_id for c in configs}

    done = pairs[:7]
    rest = plan_units(table, configs, 2, 0, 2, done=done)
    left = [(u.config.config_id, pid) for u in rest for pid in u.prompt_ids]
    assert sorted(left) == sorted(pairs[7:])


def test_unit_ids_are_named_by_content():
    configs = configurations(SWEEP)
    first = plan_units(prompts(4), configs, 1, 0, 2)
    again = plan_units(prompts(4), configs, 1, 0, 2)
    assert [u.unit_id for u in first] == [u.unit_id for u in again]
    assert len({u.unit_id for u in first}) == len(first)


def test_negative_prompt_from_the_row_else_the_sweep():
    config = Config("ddim", 10, 7.5, 64, 64, "sweep negative")
    (unit,) = plan_units(prompts(3), [config], 1, 0, shard_size=3)
    assert unit.negative_prompts == ("sweep negative", "sweep negative", "own negative")


def test_split_halves_are_the_units_a_plan_of_those_prompts_makes():
    config = configurations(SWEEP)[0]
    (unit,) = plan_units(prompts(5), [config], 2, 0, 5)
    first, second = split_unit(unit)
    assert first.prompt_ids == ("p0", "p1", "p2") and second.prompt_ids == ("p3", "p4")
    assert second.negative_prompts[-1] == "own negative" and second.prompts[0] == "prompt 3"
    # the same ids and contents a fresh plan gives, so markers and resumes agree on them
    for piece, rows in ((first, slice(0, 3)), (second, slice(3, 5))):
        (planned,) = plan_units(prompts(5).iloc[rows], [config], 2, 0, 5)
        assert piece == planned
    (one,) = plan_units(prompts(1), [config], 2, 0, 5)
    assert split_unit(one) == []


def test_config_ids_of_outputs_made_before_models_were_an_axis_do_not_change():
    # tests/fixtures/output-0.1.0 holds this configuration under this id
    assert Config("ddim", 2, 1.0, 32, 32, "").config_id == "ddim-s2-g1-26561f"
    one = Sweep(scheduler=("ddim",), num_inference_steps=(2,), guidance_scale=(1.0,))
    one = dataclasses.replace(one, height=32, width=32)
    (config,) = configurations(one, ("builtin:tiny",))
    assert config.model == "builtin:tiny" and config.config_id == "ddim-s2-g1-26561f"


def test_models_and_adapters_are_axes_and_extension_keeps_every_id():
    lora = (None, Adapter("builtin:toy-purple", (0.5, 1.0)))
    sweep = Sweep(scheduler=("ddim",), num_inference_steps=(2,), guidance_scale=(1.0,), lora=lora)
    configs = configurations(sweep, ("builtin:toy", "builtin:tiny"))
    assert [(c.model, c.lora, c.lora_scale) for c in configs] == [
        ("builtin:toy", None, None),
        ("builtin:toy", "builtin:toy-purple", 0.5),
        ("builtin:toy", "builtin:toy-purple", 1.0),
        ("builtin:tiny", None, None),
        ("builtin:tiny", "builtin:toy-purple", 0.5),
        ("builtin:tiny", "builtin:toy-purple", 1.0),
    ]
    ids = [c.config_id for c in configs]
    assert len(set(ids)) == 6 and ids[1].startswith("ddim-s2-g1-lora0.5-")
    # the first model without an adapter keeps the id it had as the only model
    plain = dataclasses.replace(sweep, lora=(None,))
    assert ids[0] == configurations(plain, ("builtin:toy",))[0].config_id
    # listed in another order, or with a model more, the run's first model decides the ids
    extended = configurations(sweep, ("builtin:x", "builtin:tiny", "builtin:toy"), "builtin:toy")
    assert set(ids) <= {c.config_id for c in extended}
