"""The shapes world: small images of one colored shape whose caption names everything in them.

A scene is (shape, color, size, position), drawn by PIL deterministically from a seed on a light
background, with a little jitter in place and size. Its caption reads "a small red circle on the
left". The world yields (image, caption) pairs to train `builtin:toy-clip` and `builtin:toy`, true
images of any caption to serve as an FID reference, and `judge`: a check of an image against its
caption from the pixels alone (the object's hue, its centroid, its area and how much of its bounding
box it fills), which needs no model and so can grade one.

Purple is the world's one color the base models never saw: `SCENES`, their training scenes, leave
it out; `PURPLE_SCENES` are what the `builtin:toy-purple` adapter learns.

For the image-conditioned tasks, a scene also has its object's mask (`object_mask`) and a depth
map (`depth_map`: the object's silhouette, brighter for a larger, nearer object), drawn with the
render's own coordinates; `edits` are the rows of each task's prompt file (img2img and depth2img:
another color; inpaint: another shape, the object's area masked; outpaint: the scene's left 24
columns, the prompt naming the whole scene).

Write a reference set (the demo suite's `eval/demo-reference.parquet`) and the tasks' prompt files:
    python -m sdbatch.toy.world eval/demo-reference.parquet --count 1024
    python -m sdbatch.toy.world edits jobs/inpaint-prompts.parquet --task inpaint
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import random
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from sdbatch.publish import publish_beside

SIZE = 32  # pixels: small enough to train on 2 CPU cores, large enough for three shapes
BACKGROUND = (235, 235, 230)
COLORS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 200, 30),
    # At least 112 from every other color, and farther than their own color from the mean color
    # of every object builtin:toy draws (by 78 or more), so the judge's verdicts on the base
    # colors are the same as without it.
    "purple": (140, 40, 170),
}
# How far an object's mean color may lie from the palette color it is judged to be. A blend is
# not a color: builtin:toy, asked for purple, which it never saw, mixes red and blue into a dull
# (138, 51, 115), 57 from purple (median); every base color it draws lies within 36 of its own.
COLOR_TOLERANCE = 45
BASE_COLORS = ("red", "green", "blue", "yellow")  # what builtin:toy and builtin:toy-clip know
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.2, "large": 0.34}  # radius as a fraction of the image side
POSITIONS = {"left": 0.27, "center": 0.5, "right": 0.73}  # centroid x as a fraction
# How much of its bounding box each shape fills: what tells them apart in `judge`.
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
NEAREST = 0.4  # a radius (fraction of the side) drawn at depth 255; the largest is 0.374
CAPTION = re.compile(
    rf"\ba (?P<size>{'|'.join(SIZES)}) (?P<color>{'|'.join(COLORS)}) "
    rf"(?P<shape>{'|'.join(SHAPES)}) (?:on the |in the )(?P<position>{'|'.join(POSITIONS)})\b"
)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return self.describe(size=True, position=True)

    def describe(self, size: bool, position: bool) -> str:
        """The caption, naming the size and the position or leaving them out."""
        text = f"a {self.size + ' ' if size else ''}{self.color} {self.shape}"
        if position:
            text += " in the center" if self.position == "center" else f" on the {self.position}"
        return text

    @classmethod
    def parse(cls, caption: str) -> Scene | None:
        """The scene a caption describes, or None if it is not one of the world's captions."""
        match = CAPTION.search(caption)
        return cls(**match.groupdict()) if match else None


def scenes_of(colors: tuple[str, ...]) -> list[Scene]:
    """Every scene in one of `colors`."""
    return [Scene(*s) for s in itertools.product(SHAPES, colors, SIZES, POSITIONS)]


SCENES = scenes_of(BASE_COLORS)  # builtin:toy's and builtin:toy-clip's training scenes
PURPLE_SCENES = scenes_of(("purple",))
ATTRIBUTES_OF = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}


@dataclass(frozen=True)
class Placement:
    """Where a scene's object lies in one image: its center and radius, in pixels."""

    cx: float
    cy: float
    radius: float


def place(scene: Scene, seed: int, size: int = SIZE) -> Placement:
    """The object's placement in `render(scene, seed, size)`: the seed moves and scales it a
    little."""
    rng = random.Random(seed)
    radius = size * SIZES[scene.size] * rng.uniform(0.9, 1.1)
    cx = size * POSITIONS[scene.position] + rng.uniform(-0.04, 0.04) * size
    cy = size * rng.uniform(0.38, 0.62)
    return Placement(cx, cy, radius)


def _draw(image: Image.Image, shape: str, at: Placement, fill: Any) -> None:
    # PIL fills shapes without antialiasing: a pixel is the object's or the background's, so the
    # mask drawn here with the render's coordinates is exactly the rendered object.
    draw = ImageDraw.Draw(image)
    cx, cy, radius = at.cx, at.cy, at.radius
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        side = radius * 0.9  # a square of the circle's area would look larger
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
        )


def render(scene: Scene, seed: int, size: int = SIZE) -> Image.Image:
    """An image of `scene`; the seed moves and scales the shape a little."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    _draw(image, scene.shape, place(scene, seed, size), COLORS[scene.color])
    return image


def object_mask(scene: Scene, seed: int, size: int = SIZE) -> Image.Image:
    """The object's area in `render(scene, seed, size)`: an "L" image, 255 inside, 0 outside."""
    image = Image.new("L", (size, size), 0)
    _draw(image, scene.shape, place(scene, seed, size), 255)
    return image


def depth_map(scene: Scene, seed: int, size: int = SIZE) -> Image.Image:
    """The depth of `render(scene, seed, size)`, nearer brighter: an "L" image, the background 0
    and the object's silhouette one value that grows with its radius (a larger object is nearer):
    small objects 115-140, large ones 195-238."""
    at = place(scene, seed, size)
    image = Image.new("L", (size, size), 0)
    _draw(image, scene.shape, at, round(255 * min(1.0, at.radius / size / NEAREST)))
    return image


def draws(count: int, seed: int = 0, scenes: list[Scene] = SCENES) -> list[tuple[Scene, int]]:
    """`count` (scene, render seed) pairs of `scenes`, the same for the same seed."""
    rng = random.Random(seed)
    return [(rng.choice(scenes), rng.getrandbits(32)) for _ in range(count)]


def samples(
    count: int, seed: int = 0, size: int = SIZE, scenes: list[Scene] = SCENES
) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs of `scenes`, the same for the same seed."""
    return [(render(s, k, size), s.caption) for s, k in draws(count, seed, scenes)]


@dataclass(frozen=True)
class Judgement:
    """What the pixels say about an image, against the scene its caption asked for."""

    color: bool
    shape: bool
    size: bool
    position: bool


def judge(image: np.ndarray, scene: Scene) -> Judgement:
    """Check an H x W x 3 uint8 image against `scene` from its pixels alone.

    The object is every pixel far from the background. Its color is the palette color nearest to
    its mean, if within COLOR_TOLERANCE of it; its shape is the one whose fill ratio (area /
    bounding box) is nearest; its size and position come from its area and centroid, against the
    renderer's own values.
    """
    pixels = np.asarray(image, dtype=np.float64)
    side = pixels.shape[1]
    mask = np.linalg.norm(pixels - BACKGROUND, axis=2) > 60
    if mask.sum() < 4:
        return Judgement(False, False, False, False)
    mean = pixels[mask].mean(axis=0)
    color = min(COLORS, key=lambda c: np.linalg.norm(mean - COLORS[c]))
    if np.linalg.norm(mean - COLORS[color]) > COLOR_TOLERANCE:
        color = None
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    shape = min(FILL, key=lambda s: abs(fill - FILL[s]))
    radius = np.sqrt(box) / 2 / side
    size = min(SIZES, key=lambda s: abs(radius - SIZES[s] * 0.95))
    position = min(POSITIONS, key=lambda p: abs(cols.mean() / side - POSITIONS[p]))
    return Judgement(
        color == scene.color, shape == scene.shape, size == scene.size, position == scene.position
    )


def _png(image: Image.Image, path: str) -> dict[str, Any]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": path}


def _publish_rows(path: str, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows)
    publish_beside(path, lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))


def write_reference(path: str, count: int, size: int = SIZE, seed: int = 0) -> None:
    """A Parquet of `count` rendered images in sdbatch's image column format, with captions."""
    rows = [
        {"image": _png(image, f"{i:05d}.png"), "caption": caption}
        for i, (image, caption) in enumerate(samples(count, seed, size))
    ]
    _publish_rows(path, rows)


TASKS = ("img2img", "inpaint", "outpaint", "depth2img")
# Outpaint sources are a scene's left 24 columns: `sweep.outpaint: [{right: 8}]` asks for the
# whole 32 px scene back, whose caption the prompt is, so the judge can grade the result.
OUTPAINT_KEEP = 24
LATENT_CELL = 4  # builtin:toy's autoencoder: one latent per 4 x 4 pixels


@dataclass(frozen=True)
class Edit:
    """A prompt file row: a source scene drawn with `seed`, and the scene asked for."""

    source: Scene
    seed: int
    target: Scene


def edits(task: str, count: int, seed: int = 0) -> list[Edit]:
    """`count` edits for `task`, the same for the same seed, over distinct base scenes (up to 72).

    img2img and depth2img change the color, inpaint the shape (the object's area masked), and
    outpaint asks for the scene the source was cropped from.
    """
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    order = rng.sample(SCENES, len(SCENES))
    result = []
    for i in range(count):
        scene = order[i % len(order)]
        if task in ("img2img", "depth2img"):
            others = [c for c in BASE_COLORS if c != scene.color]
            target = dataclasses.replace(scene, color=rng.choice(others))
        elif task == "inpaint":
            others = [s for s in SHAPES if s != scene.shape]
            target = dataclasses.replace(scene, shape=rng.choice(others))
        else:
            target = scene
        result.append(Edit(scene, rng.getrandbits(32), target))
    return result


def cover(mask: np.ndarray, cell: int = LATENT_CELL) -> np.ndarray:
    """`mask` (H x W, nonzero inside) grown to whole `cell` x `cell` blocks: every block with a
    masked pixel masked whole (255), so that a mask downsized to the latents keeps all of it."""
    h, w = mask.shape
    blocks = (mask.reshape(h // cell, cell, w // cell, cell) > 0).any(axis=(1, 3))
    return np.repeat(np.repeat(blocks, cell, axis=0), cell, axis=1).astype(np.uint8) * 255


def inpaint_mask(edit: Edit, size: int = SIZE) -> Image.Image:
    """What an inpaint edit repaints: the source's object and the target's at the same place,
    grown to whole latent cells (so no trace of the old shape is left to copy)."""
    both = np.maximum(
        np.asarray(object_mask(edit.source, edit.seed, size)),
        np.asarray(object_mask(edit.target, edit.seed, size)),
    )
    return Image.fromarray(cover(both), mode="L")


def edit_row(task: str, index: int, edit: Edit, size: int = SIZE) -> dict[str, Any]:
    """A prompt row for `edit`: prompt_id, prompt (the target's caption), image, mask, depth
    (image structs, "L" PNGs; null where the task has none) and source_prompt."""
    prompt_id = f"{task}-{index:03d}"
    image = render(edit.source, edit.seed, size)
    mask: Image.Image | None = object_mask(edit.source, edit.seed, size)
    depth: Image.Image | None = depth_map(edit.source, edit.seed, size)
    source_prompt: str | None = edit.source.caption
    if task == "inpaint":
        mask = inpaint_mask(edit, size)
    elif task == "outpaint":
        image = image.crop((0, 0, OUTPAINT_KEEP * size // SIZE, size))
        # The crop is no whole scene, and a caption equal to the prompt has no direction.
        mask = depth = source_prompt = None
    return {
        "prompt_id": prompt_id,
        "prompt": edit.target.caption,
        "image": _png(image, f"{prompt_id}.png"),
        "mask": None if mask is None else _png(mask, f"{prompt_id}-mask.png"),
        "depth": None if depth is None else _png(depth, f"{prompt_id}-depth.png"),
        "source_prompt": source_prompt,
    }


def write_edits(path: str, task: str, count: int = 24, seed: int = 0) -> None:
    """The prompt file of `task`'s job: `count` rows of `edit_row`, as Parquet."""
    rows = [edit_row(task, i, edit) for i, edit in enumerate(edits(task, count, seed))]
    _publish_rows(path, rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["edits"]:
        parser = argparse.ArgumentParser(
            prog="python -m sdbatch.toy.world edits",
            description="Write a task's prompt file: world scenes and the edits asked of them.",
        )
        parser.add_argument("path", help="Parquet file to write")
        parser.add_argument("--task", required=True, choices=TASKS)
        parser.add_argument("--count", type=int, default=24)
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(argv[1:])
        write_edits(args.path, args.task, args.count, args.seed)
    else:
        parser = argparse.ArgumentParser(
            description="Render a reference set of the shapes world "
            "(or `edits PATH --task T`: a task's prompt file)."
        )
        parser.add_argument("path", help="Parquet file to write")
        parser.add_argument("--count", type=int, default=256)
        parser.add_argument("--size", type=int, default=SIZE)
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(argv)
        write_reference(args.path, args.count, args.size, args.seed)
    print(args.path)


if __name__ == "__main__":
    main()
