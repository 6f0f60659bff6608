"""The shapes world: small images of one colored shape whose caption names everything in them.

A scene is (shape, color, size, position), drawn by PIL deterministically from a seed on a light
background, with a little jitter in place and size. Its caption reads "a small red circle on the
left". The world yields (image, caption) pairs to train `builtin:toy-clip` and `builtin:toy`, true
images of any caption to serve as an FID reference, and `judge`: a check of an image against its
caption from the pixels alone (the object's hue, its centroid, its area and how much of its bounding
box it fills), which needs no model and so can grade one.

Purple is the world's one color the base models never saw: `SCENES`, their training scenes, leave
it out; `PURPLE_SCENES` are what the `builtin:toy-purple` adapter learns.

Write a reference set (the demo suite's `eval/demo-reference.parquet`):
    python -m sdbatch.toy.world eval/demo-reference.parquet --count 1024
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import re
from dataclasses import dataclass

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


def render(scene: Scene, seed: int, size: int = SIZE) -> Image.Image:
    """An image of `scene`; the seed moves and scales the shape a little."""
    rng = random.Random(seed)
    radius = size * SIZES[scene.size] * rng.uniform(0.9, 1.1)
    cx = size * POSITIONS[scene.position] + rng.uniform(-0.04, 0.04) * size
    cy = size * rng.uniform(0.38, 0.62)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    color = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
    elif scene.shape == "square":
        side = radius * 0.9  # a square of the circle's area would look larger
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=color)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color
        )
    return image


def samples(
    count: int, seed: int = 0, size: int = SIZE, scenes: list[Scene] = SCENES
) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs of `scenes`, the same for the same seed."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        scene = rng.choice(scenes)
        pairs.append((render(scene, rng.getrandbits(32), size), scene.caption))
    return pairs


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


def write_reference(path: str, count: int, size: int = SIZE, seed: int = 0) -> None:
    """A Parquet of `count` rendered images in sdbatch's image column format, with captions."""
    rows = []
    for i, (image, caption) in enumerate(samples(count, seed, size)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append(
            {"image": {"bytes": buffer.getvalue(), "path": f"{i:05d}.png"}, "caption": caption}
        )
    table = pa.Table.from_pylist(rows)
    publish_beside(path, lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a reference set of the shapes world.")
    parser.add_argument("path", help="Parquet file to write")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_reference(args.path, args.count, args.size, args.seed)
    print(args.path)


if __name__ == "__main__":
    main()
