"""Generated Pinterest-style corpora for the offline demo and the tests.

The images are drawn with :mod:`PIL.ImageDraw`: each demo category has its own kind of
scene (plates of fruit, building facades, mountain landscapes, cars on a road, dresses,
abstract brush strokes) with random placement, scale, colour jitter and background, so that
images of one category look alike to a pretrained CNN while still differing from each other.

Two on-disk layouts are produced:

* the *Pinterest tree* read by pinsearch's ingestion code::

    ROOT/<user>/<board>/board.json            {"name", "category", "description"}
    ROOT/<user>/<board>/<pin_id>/<pin_id>.jpg
    ROOT/<user>/<board>/<pin_id>/pin.json     {"id", "title", "description", "link"}

* a plain *image folder*, ``ROOT/<category>/<name>.jpg``.

Everything is deterministic given the seed: two runs write byte-identical files.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "DEMO_CATEGORIES",
    "SyntheticCorpus",
    "draw_pin_image",
    "make_image_folder",
    "make_pinterest_tree",
    "write_manifest",
]

DEMO_CATEGORIES: tuple[str, ...] = (
    "food_drink",
    "architecture",
    "outdoors",
    "cars_motorcycles",
    "womens_fashion",
    "art",
)
"""The six categories of the demo corpus (names follow Pinterest's category slugs)."""

_logger = logging.getLogger(__name__)

_JPEG_QUALITY = 90
_MIN_IMAGE_SIZE = 32
_PIN_ID_LOW = 10**17  # smallest 18-digit number
_PIN_ID_HIGH = 10**18  # exclusive upper bound

RGB = tuple[int, int, int]
_Drawer = Callable[[np.random.Generator, int], tuple[Image.Image, str]]


@dataclass(frozen=True)
class SyntheticCorpus:
    """Summary of a generated corpus.

    Attributes:
        root: Directory the corpus was written to.
        n_pins: Number of images written.
        categories: Categories present, in generation order.
        users: User directory names (empty for an image folder).
        boards: Boards as ``"user/board"`` (empty for an image folder).
    """

    root: Path
    n_pins: int
    categories: tuple[str, ...]
    users: tuple[str, ...]
    boards: tuple[str, ...]


# --------------------------------------------------------------------------------------
# Colour and geometry helpers
# --------------------------------------------------------------------------------------


def _jitter(colour: Sequence[int], rng: np.random.Generator, amount: int = 18) -> RGB:
    """Shift each channel of ``colour`` by a random offset in ``[-amount, amount]``."""
    shifted = np.asarray(colour, dtype=np.int64) + rng.integers(-amount, amount + 1, size=3)
    r, g, b = (int(v) for v in np.clip(shifted, 0, 255))
    return (r, g, b)


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    """Linear interpolation between two colours (``t=0`` gives ``a``)."""
    r, g, bl = (int(x + (y - x) * t + 0.5) for x, y in zip(a, b, strict=True))
    return (r, g, bl)


def _vertical_gradient(size: int, top: Sequence[int], bottom: Sequence[int]) -> Image.Image:
    """A square RGB image fading from ``top`` to ``bottom``."""
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    rows = (1.0 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    pixels = np.broadcast_to(rows[:, None, :], (size, size, 3))
    return Image.fromarray(np.ascontiguousarray(pixels.round().astype(np.uint8)), "RGB")


def _saturated(rng: np.random.Generator) -> RGB:
    """A random strongly saturated, bright colour."""
    hue = float(rng.random())
    sat = float(rng.uniform(0.75, 1.0))
    val = float(rng.uniform(0.7, 1.0))
    i = int(hue * 6.0) % 6
    f = hue * 6.0 - int(hue * 6.0)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    r, g, b = (int(255 * c + 0.5) for c in rgb)
    return (r, g, b)


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    """Pick one string uniformly."""
    return options[int(rng.integers(len(options)))]


def _finish(image: Image.Image, rng: np.random.Generator, noise: float = 5.0) -> Image.Image:
    """Soften hard edges and add sensor-like noise so the JPEGs look less flat."""
    image = image.filter(ImageFilter.GaussianBlur(radius=0.7))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------
# Category drawers: each returns the (unfinished) image and a short title
# --------------------------------------------------------------------------------------

_FRUITS: dict[str, RGB] = {
    "strawberries": (200, 30, 45),
    "oranges": (240, 135, 20),
    "blueberries": (55, 65, 150),
    "limes": (110, 185, 50),
    "lemons": (245, 215, 45),
    "grapes": (115, 45, 120),
    "cherries": (150, 15, 35),
}
_TABLES: dict[str, RGB] = {
    "wood": (135, 90, 55),
    "dark wood": (85, 55, 35),
    "linen": (225, 215, 195),
    "slate": (70, 75, 80),
}


def _draw_food(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Plates and bowls of round fruit on a table, seen from above."""
    table_name = _choice(rng, list(_TABLES))
    table = _jitter(_TABLES[table_name], rng)
    image = Image.new("RGB", (size, size), table)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.35:  # checked tablecloth
        cloth = _jitter((190, 35, 40) if rng.random() < 0.6 else (40, 70, 160), rng)
        step = max(4, int(size * rng.uniform(0.08, 0.14)))
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2 == 0:
                    draw.rectangle([i, j, i + step - 1, j + step - 1], fill=cloth)
        table_name = "checked tablecloth"
    elif "wood" in table_name:  # grain
        dark = _mix(table, (0, 0, 0), 0.25)
        for _ in range(int(rng.integers(6, 14))):
            y = int(rng.integers(0, size))
            draw.line([(0, y), (size, y + int(rng.integers(-6, 7)))], fill=dark, width=1)

    fruit = _choice(rng, list(_FRUITS))
    n_plates = int(rng.choice([1, 1, 2, 3]))
    is_bowl = rng.random() < 0.5
    drink = rng.random() < 0.3
    for _ in range(n_plates):
        radius = size * rng.uniform(0.22, 0.4) / (1.0 + 0.3 * (n_plates - 1))
        cx = rng.uniform(radius, size - radius)
        cy = rng.uniform(radius, size - radius)
        rim = _jitter((245, 245, 240) if rng.random() < 0.7 else (215, 225, 235), rng, 10)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=rim)
        inner = radius * (0.72 if is_bowl else 0.82)
        draw.ellipse(
            [cx - inner, cy - inner, cx + inner, cy + inner],
            fill=_mix(rim, (120, 120, 120), 0.18 if is_bowl else 0.06),
        )
        colour = _FRUITS[fruit]
        n_items = int(rng.integers(4, 11))
        item_r = inner * rng.uniform(0.2, 0.3)
        for _ in range(n_items):
            ang = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0, inner - item_r)
            fx, fy = cx + dist * np.cos(ang), cy + dist * np.sin(ang)
            r = item_r * rng.uniform(0.8, 1.15)
            draw.ellipse([fx - r, fy - r, fx + r, fy + r], fill=_jitter(colour, rng, 22))
            hl = r * 0.3
            hx, hy = fx - r * 0.35, fy - r * 0.35
            draw.ellipse([hx - hl, hy - hl, hx + hl, hy + hl], fill=_mix(colour, (255,) * 3, 0.5))
    if drink:
        r = size * rng.uniform(0.08, 0.12)
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 240, 235))
        draw.ellipse(
            [cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r],
            fill=_jitter((95, 55, 30), rng, 12),
        )
    vessel = "bowl" if is_bowl else "plate"
    if drink:
        title = f"{fruit} and coffee for breakfast"
    elif n_plates > 1:
        title = f"{vessel}s of {fruit} on {table_name}"
    else:
        title = f"{vessel} of {fruit}"
    return image, title


_FACADES: dict[str, RGB] = {
    "brick": (160, 70, 50),
    "sandstone": (215, 190, 140),
    "concrete": (150, 150, 150),
    "white stucco": (235, 232, 222),
    "blue-painted": (90, 125, 170),
}


def _draw_architecture(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Building facades with window grids and roofs against the sky."""
    sky_top = _jitter((70, 130, 210), rng, 20)
    image = _vertical_gradient(size, sky_top, _mix(sky_top, (235, 240, 250), 0.7))
    draw = ImageDraw.Draw(image)
    ground_y = int(size * rng.uniform(0.82, 0.94))
    draw.rectangle([0, ground_y, size, size], fill=_jitter((120, 120, 115), rng, 10))

    n_buildings = int(rng.choice([1, 2, 2, 3]))
    material = _choice(rng, list(_FACADES))
    roofed = rng.random() < 0.5
    x = rng.uniform(-0.05, 0.1) * size
    for _ in range(n_buildings):
        width = size * rng.uniform(0.28, 0.62)
        height = size * rng.uniform(0.4, 0.78)
        left, right = x, x + width
        top = ground_y - height
        facade = _jitter(_FACADES[material], rng, 15)
        draw.rectangle([left, top, right, ground_y], fill=facade)
        if roofed:
            peak = top - height * rng.uniform(0.2, 0.4)
            roof = _jitter((120, 50, 40) if rng.random() < 0.6 else (60, 60, 70), rng, 12)
            overhang = width * 0.06
            draw.polygon(
                [(left - overhang, top), ((left + right) / 2, peak), (right + overhang, top)],
                fill=roof,
            )
        cols = int(rng.integers(2, 6))
        rows = max(2, int(height / (size * rng.uniform(0.08, 0.13))))
        glass = _jitter((40, 55, 80) if rng.random() < 0.6 else (150, 190, 220), rng, 12)
        frame = _mix(facade, (255, 255, 255), 0.5)
        cell_w = width / cols
        cell_h = (height * 0.85) / rows
        for r in range(rows):
            for c in range(cols):
                wx0 = left + c * cell_w + cell_w * 0.22
                wy0 = top + height * 0.06 + r * cell_h + cell_h * 0.2
                wx1, wy1 = wx0 + cell_w * 0.56, wy0 + cell_h * 0.6
                draw.rectangle([wx0 - 1, wy0 - 1, wx1 + 1, wy1 + 1], fill=frame)
                draw.rectangle([wx0, wy0, wx1, wy1], fill=glass)
        door_w = min(cell_w * 0.6, width * 0.2)
        door_x = (left + right) / 2 - door_w / 2
        draw.rectangle(
            [door_x, ground_y - cell_h * 0.9, door_x + door_w, ground_y],
            fill=_jitter((70, 45, 30), rng, 10),
        )
        x = right + size * rng.uniform(0.0, 0.08)
        if x > size * 0.85:
            break
    kind = "townhouse" if roofed else _choice(rng, ["apartment block", "office building"])
    title = f"{material} {kind} facade"
    if n_buildings > 1:
        title = f"row of {material} {kind}s" if roofed else f"{material} {kind}s on the street"
    return image, title


def _draw_outdoors(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Landscapes: sky gradient, sun, mountain ranges, green ground, maybe a lake."""
    mood = _choice(rng, ["day", "sunset", "dawn"])
    skies = {
        "day": ((60, 130, 220), (190, 220, 245)),
        "sunset": ((70, 50, 120), (250, 150, 80)),
        "dawn": ((120, 160, 215), (250, 200, 170)),
    }
    top, bottom = skies[mood]
    image = _vertical_gradient(size, _jitter(top, rng), _jitter(bottom, rng))
    draw = ImageDraw.Draw(image)

    sun_r = size * rng.uniform(0.05, 0.1)
    sx, sy = rng.uniform(0.15, 0.85) * size, rng.uniform(0.1, 0.4) * size
    sun = (255, 235, 120) if mood == "day" else (255, 180, 90)
    draw.ellipse([sx - sun_r, sy - sun_r, sx + sun_r, sy + sun_r], fill=sun)

    horizon = size * rng.uniform(0.55, 0.72)
    n_ranges = int(rng.integers(2, 4))
    far = _jitter((120, 130, 160), rng, 15)
    near = _jitter((70, 80, 95), rng, 15)
    snowy = rng.random() < 0.5
    for k in range(n_ranges):
        colour = _mix(far, near, k / max(1, n_ranges - 1))
        base = horizon + k * size * 0.03
        peaks = []
        for px in np.sort(rng.uniform(-0.1, 1.1, size=int(rng.integers(2, 5)))) * size:
            height = size * rng.uniform(0.18, 0.42) * (1.0 - 0.2 * k)
            peaks.append((float(px), height, size * rng.uniform(0.12, 0.25)))
        for px, height, half in peaks:
            draw.polygon([(px - half, base), (px, base - height), (px + half, base)], fill=colour)
        draw.rectangle([0, base, size, size], fill=colour)
        if snowy and k == 0:
            for px, height, half in peaks:
                cap = 0.3
                draw.polygon(
                    [
                        (px - half * cap, base - height * (1 - cap)),
                        (px, base - height),
                        (px + half * cap, base - height * (1 - cap)),
                    ],
                    fill=(245, 245, 250),
                )
    grass = _jitter((70, 140, 60) if mood == "day" else (50, 100, 55), rng, 15)
    ground_top = horizon + n_ranges * size * 0.03
    draw.rectangle([0, ground_top, size, size], fill=grass)
    lake = rng.random() < 0.4
    if lake:
        lw = size * rng.uniform(0.3, 0.6)
        lx = rng.uniform(0, size - lw)
        ly = ground_top + (size - ground_top) * rng.uniform(0.2, 0.5)
        draw.ellipse([lx, ly, lx + lw, ly + (size - ground_top) * 0.4], fill=_mix(top, bottom, 0.4))
    dark = _mix(grass, (0, 30, 0), 0.45)
    for _ in range(int(rng.integers(2, 9))):
        tx = rng.uniform(0, size)
        ty = rng.uniform(ground_top + 4, size)
        th = size * rng.uniform(0.06, 0.14)
        draw.polygon([(tx - th * 0.35, ty), (tx, ty - th), (tx + th * 0.35, ty)], fill=dark)
    if lake:
        title = {
            "day": "mountain lake at noon",
            "sunset": "lake at sunset",
            "dawn": "lake at dawn",
        }[mood]
    else:
        title = {
            "day": _choice(rng, ["alpine meadow in summer", "green valley and mountains"]),
            "sunset": "sunset over the mountains",
            "dawn": "mountain sunrise hike",
        }[mood]
    if snowy and not lake:
        title = "snowy peaks above the valley" if mood == "day" else title
    return image, title


_CAR_COLOURS: dict[str, RGB] = {
    "red": (190, 30, 35),
    "blue": (35, 75, 170),
    "black": (30, 30, 35),
    "silver": (185, 190, 195),
    "yellow": (240, 200, 40),
    "green": (40, 110, 60),
    "white": (238, 238, 235),
}


def _draw_vehicle(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    x: float,
    ground: float,
    length: float,
    colour: RGB,
    motorcycle: bool,
    facing_right: bool,
) -> None:
    """Draw a side-view car or motorcycle whose wheels touch ``ground``."""
    tyre = (25, 25, 28)
    hub = (150, 150, 155)

    def wheel(cx: float, r: float) -> None:
        draw.ellipse([cx - r, ground - 2 * r, cx + r, ground], fill=tyre)
        draw.ellipse([cx - r * 0.45, ground - r * 1.45, cx + r * 0.45, ground - r * 0.55], fill=hub)

    def fx(u: float) -> float:  # position along the vehicle, mirrored when facing left
        return x + (u if facing_right else 1.0 - u) * length

    if motorcycle:
        r = length * 0.2
        body_y = ground - 2.1 * r
        draw.polygon(
            [
                (fx(0.22), body_y),
                (fx(0.45), body_y - r * 0.5),
                (fx(0.7), body_y - r * 0.45),
                (fx(0.78), body_y + r * 0.2),
                (fx(0.3), body_y + r * 0.45),
            ],
            fill=colour,
        )
        draw.line([(fx(0.8), ground - r), (fx(0.72), body_y - r * 1.1)], fill=tyre, width=3)
        draw.line([(fx(0.66), body_y - r * 1.1), (fx(0.78), body_y - r * 1.2)], fill=tyre, width=3)
        seat0, seat1 = sorted((fx(0.3), fx(0.5)))
        draw.rectangle([seat0, body_y - r * 0.75, seat1, body_y - r * 0.45], fill=tyre)
        wheel(fx(0.18), r)
        wheel(fx(0.82), r)
        return
    r = length * rng.uniform(0.1, 0.13)
    body_bottom = ground - r * 0.9
    body_top = body_bottom - length * rng.uniform(0.16, 0.22)
    draw.rounded_rectangle(
        [x, body_top, x + length, body_bottom], radius=max(1.0, length * 0.06), fill=colour
    )
    cabin_h = length * rng.uniform(0.14, 0.2)
    c0, c1 = sorted((fx(0.22), fx(0.72)))
    draw.chord([c0, body_top - cabin_h, c1, body_top + cabin_h], 180, 360, fill=colour)
    glass = _jitter((150, 190, 220), rng, 12)
    inset = (c1 - c0) * 0.1
    mid = (c0 + c1) / 2
    draw.chord(
        [c0 + inset, body_top - cabin_h * 0.78, mid - 1, body_top + cabin_h * 0.78],
        180,
        270,
        fill=glass,
    )
    draw.chord(
        [mid + 1, body_top - cabin_h * 0.78, c1 - inset, body_top + cabin_h * 0.78],
        270,
        360,
        fill=glass,
    )
    draw.rectangle([mid - inset, body_top - cabin_h * 0.75, mid + 1, body_top], fill=glass)
    light = fx(0.97)
    draw.ellipse(
        [light - r * 0.2, body_top + r * 0.3, light + r * 0.2, body_top + r * 0.7],
        fill=(250, 240, 190),
    )
    wheel(fx(0.2), r)
    wheel(fx(0.8), r)


def _draw_cars(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A car or motorcycle in side view on a road."""
    sky_top = _jitter((110, 160, 220), rng, 20)
    image = _vertical_gradient(size, sky_top, _jitter((215, 225, 235), rng, 10))
    draw = ImageDraw.Draw(image)
    horizon = size * rng.uniform(0.35, 0.55)
    draw.rectangle([0, horizon, size, size], fill=_jitter((85, 135, 70), rng, 15))
    road_top = horizon + (size - horizon) * rng.uniform(0.1, 0.3)
    draw.rectangle([0, road_top, size, size], fill=_jitter((70, 70, 75), rng, 10))
    lane_y = road_top + (size - road_top) * rng.uniform(0.65, 0.8)
    dash = size * rng.uniform(0.08, 0.14)
    offset = rng.uniform(0, 2 * dash)
    for x0 in np.arange(-offset, size, 2 * dash):
        draw.rectangle([x0, lane_y, x0 + dash, lane_y + max(2, size * 0.015)], fill=(235, 235, 225))

    motorcycle = rng.random() < 0.25
    colour_name = _choice(rng, list(_CAR_COLOURS))
    colour = _jitter(_CAR_COLOURS[colour_name], rng, 12)
    length = size * (rng.uniform(0.4, 0.6) if motorcycle else rng.uniform(0.55, 0.9))
    x = rng.uniform(0.02 * size, max(0.03 * size, size * 0.98 - length))
    ground = road_top + (lane_y - road_top) * rng.uniform(0.55, 0.95)
    _draw_vehicle(draw, rng, x, ground, length, colour, motorcycle, bool(rng.random() < 0.5))
    if motorcycle:
        title = f"{colour_name} {_choice(rng, ['motorcycle', 'cafe racer', 'touring bike'])}"
    else:
        style = _choice(rng, ["vintage car", "sports coupe", "family sedan", "classic car"])
        title = f"{colour_name} {style}"
    return image, title


_FABRICS: dict[str, RGB] = {
    "red": (185, 35, 50),
    "navy": (30, 40, 90),
    "emerald": (20, 120, 80),
    "blush pink": (235, 165, 175),
    "mustard": (215, 165, 40),
    "lavender": (170, 145, 210),
    "black": (28, 26, 30),
}


def _fabric(rng: np.random.Generator, size: int, base: RGB) -> tuple[Image.Image, str]:
    """A square of patterned fabric and the pattern's name."""
    pattern = _choice(rng, ["polka dot", "striped", "floral", "plain"])
    cloth = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(cloth)
    accent = (245, 240, 230) if sum(base) < 400 else _mix(base, (0, 0, 0), 0.55)
    if pattern == "polka dot":
        step = max(4, int(size * rng.uniform(0.05, 0.08)))
        dot = step * 0.28
        for i, y in enumerate(range(0, size, step)):
            for x in range(0, size, step):
                cx = x + (step / 2 if i % 2 else 0)
                draw.ellipse([cx - dot, y - dot, cx + dot, y + dot], fill=accent)
    elif pattern == "striped":
        step = max(3, int(size * rng.uniform(0.03, 0.06)))
        vertical = rng.random() < 0.5
        for k in range(0, size, 2 * step):
            box = [k, 0, k + step - 1, size] if vertical else [0, k, size, k + step - 1]
            draw.rectangle(box, fill=accent)
    elif pattern == "floral":
        petal = _saturated(rng)
        for _ in range(int(size * size / 180)):
            cx, cy = rng.uniform(0, size, size=2)
            pr = size * rng.uniform(0.012, 0.022)
            for ang in np.linspace(0, 2 * np.pi, 5, endpoint=False):
                px, py = cx + 1.3 * pr * np.cos(ang), cy + 1.3 * pr * np.sin(ang)
                draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=petal)
            draw.ellipse([cx - pr, cy - pr, cx + pr, cy + pr], fill=(250, 215, 60))
    return cloth, pattern


def _draw_fashion(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Dresses on hangers against a boutique wall."""
    wall = _jitter(_choice_rgb(rng, [(236, 228, 222), (220, 225, 232), (240, 232, 215)]), rng, 10)
    image = Image.new("RGB", (size, size), wall)
    draw = ImageDraw.Draw(image)
    rail_y = size * rng.uniform(0.06, 0.14)
    draw.line([(0, rail_y), (size, rail_y)], fill=(120, 110, 100), width=max(2, size // 60))
    floor_y = size * rng.uniform(0.9, 0.97)
    draw.rectangle([0, floor_y, size, size], fill=_mix(wall, (90, 70, 50), 0.5))

    n_dresses = int(rng.choice([1, 1, 2]))
    colour_name = _choice(rng, list(_FABRICS))
    cloth, pattern = _fabric(rng, size, _jitter(_FABRICS[colour_name], rng, 12))
    length = _choice(rng, ["mini", "midi", "maxi"])
    slot = size / n_dresses
    for d in range(n_dresses):
        cx = slot * (d + 0.5) + rng.uniform(-0.08, 0.08) * slot
        scale = size * rng.uniform(0.75, 0.95)  # vertical extent
        wide = min(scale, slot * 1.1)  # horizontal extent, narrower when two share the rail
        hook_y = rail_y
        shoulder_y = hook_y + scale * 0.12
        half_shoulder = wide * 0.16
        waist_y = shoulder_y + scale * 0.28
        half_waist = wide * 0.11
        hem_y = waist_y + scale * {"mini": 0.3, "midi": 0.45, "maxi": 0.58}[length]
        hem_y = min(hem_y, floor_y - 2)
        half_hem = wide * rng.uniform(0.26, 0.4)
        # Hanger: hook and triangle.
        hanger = (95, 80, 60)
        draw.line([(cx, hook_y - size * 0.02), (cx, hook_y + scale * 0.04)], fill=hanger, width=2)
        draw.line(
            [
                (cx - half_shoulder * 1.05, shoulder_y),
                (cx, hook_y + scale * 0.04),
                (cx + half_shoulder * 1.05, shoulder_y),
            ],
            fill=hanger,
            width=2,
        )
        mask = Image.new("L", (size, size), 0)
        mdraw = ImageDraw.Draw(mask)
        neck = half_shoulder * 0.45
        mdraw.polygon(
            [
                (cx - half_shoulder, shoulder_y),
                (cx - neck, shoulder_y),
                (cx, shoulder_y + scale * 0.07),
                (cx + neck, shoulder_y),
                (cx + half_shoulder, shoulder_y),
                (cx + half_waist, waist_y),
                (cx - half_waist, waist_y),
            ],
            fill=255,
        )
        mdraw.polygon(
            [
                (cx - half_waist, waist_y),
                (cx + half_waist, waist_y),
                (cx + half_hem, hem_y),
                (cx - half_hem, hem_y),
            ],
            fill=255,
        )
        image.paste(cloth, (0, 0), mask)
        belt = _mix(_FABRICS[colour_name], (0, 0, 0), 0.4)
        draw.rectangle([cx - half_waist, waist_y - 2, cx + half_waist, waist_y + 1], fill=belt)
    if pattern == "plain":
        title = f"{colour_name} {length} dress"
    else:
        title = f"{colour_name} {pattern} {_choice(rng, ['summer', 'party', length])} dress"
    if n_dresses > 1:
        title = f"two {title}es"
    return image, title


def _draw_art(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Abstract painting: many saturated brush strokes and ellipses on a canvas."""
    dark = rng.random() < 0.3
    canvas = _jitter((25, 25, 30) if dark else (245, 240, 228), rng, 8)
    image = Image.new("RGB", (size, size), canvas)
    draw = ImageDraw.Draw(image)
    palette = [_saturated(rng) for _ in range(int(rng.integers(3, 6)))]
    for _ in range(int(rng.integers(25, 60))):
        colour = _jitter(palette[int(rng.integers(len(palette)))], rng, 25)
        kind = rng.random()
        if kind < 0.6:  # brush stroke: a thick polyline
            n = int(rng.integers(2, 5))
            pts = rng.uniform(-0.1, 1.1, size=(n, 2)) * size
            width = int(size * rng.uniform(0.015, 0.06))
            draw.line([(float(a), float(b)) for a, b in pts], fill=colour, width=max(1, width))
        elif kind < 0.85:
            cx, cy = rng.uniform(0, size, size=2)
            rx, ry = size * rng.uniform(0.03, 0.15, size=2)
            if rng.random() < 0.5:
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
            else:
                outline_w = max(1, int(size * 0.015))
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=colour, width=outline_w)
        else:
            cx, cy = rng.uniform(0, size, size=2)
            r = size * rng.uniform(0.08, 0.25)
            start = float(rng.uniform(0, 360))
            draw.arc(
                [cx - r, cy - r, cx + r, cy + r],
                start,
                start + float(rng.uniform(60, 240)),
                fill=colour,
                width=max(1, int(size * 0.03)),
            )
    style = _choice(rng, ["abstract painting", "colourful brush strokes", "modern art print"])
    title = f"{style} on {'black' if dark else 'white'}" if rng.random() < 0.4 else style
    return image, title


def _choice_rgb(rng: np.random.Generator, options: Sequence[RGB]) -> RGB:
    """Pick one colour uniformly."""
    return options[int(rng.integers(len(options)))]


def _pattern_drawer(category: str) -> _Drawer:
    """A deterministic pattern style for a category without a dedicated drawer.

    The style (pattern kind, palette) is fixed by a CRC-32 of the category name, so all
    images of the category share it; placement and colour jitter come from the caller's
    generator.
    """
    style_rng = np.random.default_rng(zlib.crc32(category.encode("utf-8")))
    kind = _choice(style_rng, ["stripes", "checks", "rings", "dots"])
    background = _saturated(style_rng)
    foreground = _mix(_saturated(style_rng), (255, 255, 255), 0.2)
    angle_base = float(style_rng.uniform(0, np.pi))
    words = category.replace("_", " ").replace("-", " ").strip() or "pattern"

    def draw_pattern(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
        bg = _jitter(background, rng, 20)
        fg = _jitter(foreground, rng, 20)
        image = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(image)
        step = size * rng.uniform(0.08, 0.16)
        if kind == "stripes":
            angle = angle_base + rng.uniform(-0.3, 0.3)
            dx, dy = np.cos(angle), np.sin(angle)
            for k in np.arange(-2 * size, 2 * size, 2 * step):
                cx, cy = size / 2 + k * -dy, size / 2 + k * dx
                draw.line(
                    [
                        (cx - 2 * size * dx, cy - 2 * size * dy),
                        (cx + 2 * size * dx, cy + 2 * size * dy),
                    ],
                    fill=fg,
                    width=max(1, int(step)),
                )
        elif kind == "checks":
            cell = max(2, int(step))
            ox, oy = (int(v) for v in rng.integers(0, cell, size=2))
            for i in range(-1, size // cell + 1):
                for j in range(-1, size // cell + 1):
                    if (i + j) % 2 == 0:
                        x0, y0 = ox + i * cell, oy + j * cell
                        draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fg)
        elif kind == "rings":
            cx, cy = rng.uniform(0.2, 0.8, size=2) * size
            for radius in np.arange(step, 1.5 * size, 2 * step)[::-1]:
                draw.ellipse(
                    [cx - radius, cy - radius, cx + radius, cy + radius],
                    outline=fg,
                    width=max(1, int(step * 0.8)),
                )
        else:
            for _ in range(int(rng.integers(15, 40))):
                cx, cy = rng.uniform(0, size, size=2)
                r = step * rng.uniform(0.3, 0.8)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        return image, f"{words} {kind} {int(rng.integers(1, 100))}"

    return draw_pattern


_DRAWERS: dict[str, _Drawer] = {
    "food_drink": _draw_food,
    "architecture": _draw_architecture,
    "outdoors": _draw_outdoors,
    "cars_motorcycles": _draw_cars,
    "womens_fashion": _draw_fashion,
    "art": _draw_art,
}


def _drawer_for(category: str) -> _Drawer:
    """The drawer of a demo category, or a hash-seeded pattern drawer for any other name."""
    return _DRAWERS.get(category) or _pattern_drawer(category)


def _render(category: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Draw and finish one image; return it with its title."""
    if isinstance(size, bool) or not isinstance(size, int) or size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be an integer >= {_MIN_IMAGE_SIZE}, got {size!r}")
    image, title = _drawer_for(category)(rng, size)
    return _finish(image, rng), title


def draw_pin_image(category: str, rng: np.random.Generator, size: int = 192) -> Image.Image:
    """Draw one synthetic pin image.

    Images of the same category share a recognisable kind of scene, while placement,
    scale, colours and background vary with ``rng``. Unknown categories get an abstract
    pattern whose style is derived from a stable hash of the name.

    Args:
        category: Category name; one of :data:`DEMO_CATEGORIES` or any other string.
        rng: Source of randomness; the image is a deterministic function of its state.
        size: Width and height in pixels (at least 32).

    Returns:
        A square RGB image.

    Raises:
        ValueError: If ``size`` is too small.
    """
    return _render(category, rng, size)[0]


# --------------------------------------------------------------------------------------
# Corpus writers
# --------------------------------------------------------------------------------------

_DESCRIPTIONS = (
    "Saving this for later: {title}.",
    "Inspiration for {words}: {title}.",
    "Pinned to the {words} board: {title}.",
    "Could not resist this one: {title}.",
    "Weekend mood: {title}.",
)


def _check_positive(name: str, value: object) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_seed(seed: object) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def _check_categories(categories: Iterable[str]) -> tuple[str, ...]:
    """Validate category names, which become directory names."""
    if isinstance(categories, str):
        raise ValueError(f"categories must be a sequence of names, got the string {categories!r}")
    cats = tuple(categories)
    if not cats:
        raise ValueError("categories must not be empty")
    for cat in cats:
        if not isinstance(cat, str) or not cat.strip() or cat in (".", ".."):
            raise ValueError(f"invalid category name {cat!r}")
        if "/" in cat or "\\" in cat or "\x00" in cat:
            raise ValueError(f"category name {cat!r} must not contain path separators")
    duplicates = sorted({c for c in cats if cats.count(c) > 1})
    if duplicates:
        raise ValueError(f"duplicate categories: {duplicates!r}")
    return cats


def _category_words(category: str) -> str:
    """``"food_drink"`` -> ``"Food Drink"``."""
    words = category.replace("_", " ").replace("-", " ").split()
    return " ".join(w[:1].upper() + w[1:] for w in words) or category


def _write_json(path: Path, payload: dict[str, str]) -> None:
    """Write a small JSON document (UTF-8, indented, trailing newline)."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_jpeg(image: Image.Image, path: Path) -> None:
    """Save ``image`` as a baseline JPEG at the corpus quality."""
    image.save(path, format="JPEG", quality=_JPEG_QUALITY)


def make_pinterest_tree(
    root: str | Path,
    *,
    categories: Sequence[str] = DEMO_CATEGORIES,
    n_users: int = 3,
    boards_per_category: int = 2,
    pins_per_board: int = 8,
    image_size: int = 192,
    seed: int = 0,
) -> SyntheticCorpus:
    """Write a synthetic corpus in pinsearch's Pinterest-tree layout.

    Each category gets ``boards_per_category`` boards named ``<category>-<n>`` (``n``
    from 1). Boards are dealt to users ``user000``, ``user001``, ... round-robin in
    category order, so each user ends up with boards of several categories. Every board
    holds ``pins_per_board`` pins with unique 18-digit ids. Existing files at the same
    paths are overwritten; nothing else under ``root`` is touched.

    Args:
        root: Output directory (created if missing).
        categories: Category names; unknown names get a hash-seeded pattern style.
        n_users: Number of users to deal boards to. Users that receive no board (more
            users than boards) are not created.
        boards_per_category: Boards per category.
        pins_per_board: Pins per board.
        image_size: Width and height of the images in pixels (at least 32).
        seed: Seed for all randomness; equal seeds give byte-identical trees.

    Returns:
        Summary of what was written.

    Raises:
        ValueError: If a count, the size, the seed or a category name is invalid.
    """
    cats = _check_categories(categories)
    _check_positive("n_users", n_users)
    _check_positive("boards_per_category", boards_per_category)
    _check_positive("pins_per_board", pins_per_board)
    _check_positive("image_size", image_size)
    _check_seed(seed)
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")

    root = Path(root)
    id_rng = np.random.default_rng([seed, 0x5049_4E53])  # separate stream for pin ids
    used_ids: set[str] = set()
    users: list[str] = []
    boards: list[str] = []
    n_pins = 0
    board_index = 0
    for cat in cats:
        words = _category_words(cat)
        for n in range(1, boards_per_category + 1):
            user = f"user{board_index % n_users:03d}"
            if user not in users:
                users.append(user)
            board = f"{cat}-{n}"
            board_dir = root / user / board
            board_dir.mkdir(parents=True, exist_ok=True)
            _write_json(
                board_dir / "board.json",
                {
                    "name": f"{words} {n}",
                    "category": cat,
                    "description": f"{words} ideas collected by {user}.",
                },
            )
            boards.append(f"{user}/{board}")
            for pin_index in range(pins_per_board):
                pin_id = _new_pin_id(id_rng, used_ids)
                rng = np.random.default_rng([seed, board_index, pin_index])
                image, title = _render(cat, rng, image_size)
                template = _DESCRIPTIONS[int(rng.integers(len(_DESCRIPTIONS)))]
                pin_dir = board_dir / pin_id
                pin_dir.mkdir(exist_ok=True)
                _save_jpeg(image, pin_dir / f"{pin_id}.jpg")
                _write_json(
                    pin_dir / "pin.json",
                    {
                        "id": pin_id,
                        "title": title,
                        "description": template.format(title=title, words=words.lower()),
                        "link": f"https://example.com/{pin_id}",
                    },
                )
                n_pins += 1
            board_index += 1
    _logger.debug("wrote %d pins on %d boards under %s", n_pins, len(boards), root)
    return SyntheticCorpus(
        root=root, n_pins=n_pins, categories=cats, users=tuple(users), boards=tuple(boards)
    )


def _new_pin_id(rng: np.random.Generator, used: set[str]) -> str:
    """Draw an 18-digit numeric id not in ``used`` and record it."""
    while True:
        pin_id = str(int(rng.integers(_PIN_ID_LOW, _PIN_ID_HIGH)))
        if pin_id not in used:
            used.add(pin_id)
            return pin_id


def make_image_folder(
    root: str | Path,
    *,
    categories: Sequence[str] = DEMO_CATEGORIES,
    per_category: int = 6,
    image_size: int = 128,
    seed: int = 0,
) -> SyntheticCorpus:
    """Write a synthetic corpus as a plain image folder, ``ROOT/<category>/<name>.jpg``.

    Files are named ``<category>_<i>.jpg`` with a zero-padded index ``i``.

    Args:
        root: Output directory (created if missing).
        categories: Category names; unknown names get a hash-seeded pattern style.
        per_category: Images per category.
        image_size: Width and height of the images in pixels (at least 32).
        seed: Seed for all randomness; equal seeds give byte-identical folders.

    Returns:
        Summary of what was written (``users`` and ``boards`` are empty).

    Raises:
        ValueError: If a count, the size, the seed or a category name is invalid.
    """
    cats = _check_categories(categories)
    _check_positive("per_category", per_category)
    _check_positive("image_size", image_size)
    _check_seed(seed)
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")

    root = Path(root)
    n_images = 0
    for cat_index, cat in enumerate(cats):
        cat_dir = root / cat
        cat_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            rng = np.random.default_rng([seed, 0x464F_4C44, cat_index, i])
            image, _title = _render(cat, rng, image_size)
            _save_jpeg(image, cat_dir / f"{cat}_{i:04d}.jpg")
            n_images += 1
    _logger.debug("wrote %d images in %d categories under %s", n_images, len(cats), root)
    return SyntheticCorpus(root=root, n_pins=n_images, categories=cats, users=(), boards=())


def write_manifest(
    root: str | Path, rows: Sequence[dict[str, str]], name: str = "manifest.csv"
) -> Path:
    """Write rows of metadata as a CSV manifest.

    The header is ``path``, ``category`` (always present, in that order), followed by every
    other key found in ``rows`` in order of first appearance. Missing values are written as
    empty strings.

    Args:
        root: Directory to write into (created if missing).
        rows: One mapping per item, e.g. ``{"path": "art/art_0000.jpg", "category": "art"}``.
        name: File name of the manifest, relative to ``root``.

    Returns:
        Path of the written file.

    Raises:
        ValueError: If ``name`` is empty or a row is not a mapping.
    """
    if not name or not str(name).strip():
        raise ValueError(f"manifest name must be a non-empty file name, got {name!r}")
    columns: dict[str, None] = {"path": None, "category": None}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {index} must be a dict, got {type(row).__name__}")
        for key in row:
            columns.setdefault(str(key), None)
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({str(k): v for k, v in row.items()})
    return path
