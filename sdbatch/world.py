"""A synthetic shapes world: small images of one colored shape, drawn deterministically by PIL.

It provides real images with known content where no real dataset can be downloaded: the demo
suite's FID reference (eval/demo-reference.parquet) is rendered here.

Rebuild the demo reference:
    python -m sdbatch.world eval/demo-reference.parquet --count 128 --size 64
"""

from __future__ import annotations

import argparse
import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def render(seed: int, size: int = 64) -> tuple[Image.Image, str]:
    """One image and its caption, e.g. "a large red circle", the same for the same seed."""
    rng = random.Random(seed)
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    large = rng.random() < 0.5
    radius = size * (0.3 if large else 0.18) * rng.uniform(0.9, 1.1)
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
            fill=COLORS[color],
        )
    return image, f"a {'large' if large else 'small'} {color} {shape}"


def write_reference(path: str, count: int, size: int, seed: int = 0) -> None:
    """A Parquet of `count` rendered images in sdbatch's image column format, with captions."""
    rows = []
    for i in range(count):
        image, caption = render(seed * 1_000_003 + i, size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append(
            {"image": {"bytes": buffer.getvalue(), "path": f"{i:05d}.png"}, "caption": caption}
        )
    pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a reference set of the shapes world.")
    parser.add_argument("path", help="Parquet file to write")
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_reference(args.path, args.count, args.size, args.seed)
    print(args.path)


if __name__ == "__main__":
    main()
