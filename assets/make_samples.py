"""Draw the project's own small sample inputs: road backgrounds, car sprites and car photos.

Everything here is drawn by code from a fixed seed, so the outputs are byte-identical on
every run (with the same numpy / Pillow / libjpeg).  No real photo is used or copied.

Outputs, written next to this file::

    backgrounds/  road_00.jpg .. road_07.jpg   224x224 RGB road scenes (JPEG q90)
                  road_03_copy.jpg             near-duplicate of road_03 (for dedupe tests)
                  road_08_wide.jpg             a non-square 320x200 road scene
    cars/         car_00.png .. car_07.png     transparent RGBA car sprites
    car_photos/   photo_00.jpg .. photo_03.jpg cars on plain or checkerboard backgrounds
    car_masks/    photo_00.png .. photo_03.png 100x100 L masks (white car on black)

Regenerate with ``python assets/make_samples.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED = 20240611
HERE = Path(__file__).resolve().parent

BG_SIZE = 224
SUPERSAMPLE_BG = 2  # backgrounds are drawn at 2x, then downsampled
SUPERSAMPLE_CAR = 4  # cars are drawn at 4x, then downsampled (smooth alpha edges)
SPRITE_MARGIN = 2  # transparent pixels around the alpha bounding box
MASK_SIZE = (100, 100)

RGB = tuple[int, int, int]
Point = tuple[float, float]

# Stream ids keep every item's random numbers independent of the others.
STREAM_BACKGROUND, STREAM_CAR, STREAM_PHOTO = 1, 2, 3


def make_rng(stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, stream, index])


# --------------------------------------------------------------------------- colour helpers


def to_rgb(values: Sequence[float] | np.ndarray) -> RGB:
    r, g, b = (int(round(float(np.clip(v, 0, 255)))) for v in values)
    return r, g, b


def mix(a: Sequence[float], b: Sequence[float], t: float) -> RGB:
    """Linear blend of two colours, t=0 gives a, t=1 gives b."""
    return to_rgb(np.asarray(a, float) * (1 - t) + np.asarray(b, float) * t)


def jitter(rng: np.random.Generator, colour: Sequence[float], amount: float) -> RGB:
    return to_rgb(np.asarray(colour, dtype=float) + rng.uniform(-amount, amount, 3))


def grey(rng: np.random.Generator, low: float, high: float) -> RGB:
    """A neutral grey with a faint blue tint, like asphalt or alloy."""
    v = rng.uniform(low, high)
    return int(v), int(v), int(min(255, v + 4))


def scale_colour(colour: Sequence[float], factor: float) -> RGB:
    return to_rgb(np.asarray(colour, float) * factor)


def vertical_gradient(
    height: int, width: int, top: Sequence[float], bottom: Sequence[float]
) -> np.ndarray:
    """A (height, width, 3) float array fading from ``top`` to ``bottom``."""
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    col = np.asarray(top, float) * (1 - t) + np.asarray(bottom, float) * t
    return np.broadcast_to(col, (height, width, 3)).copy()


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random grid upsampled with bicubic interpolation."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    img = Image.fromarray(grid, "L").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img, float) / 127.5 - 1.0


# --------------------------------------------------------------------------- road scenes

SKIES: dict[str, tuple[RGB, RGB]] = {
    "day": ((70, 130, 205), (185, 212, 235)),
    "noon": ((35, 95, 185), (150, 195, 235)),
    "dusk": ((55, 45, 105), (245, 150, 85)),
    "overcast": ((112, 118, 130), (196, 199, 205)),
    "morning": ((110, 150, 205), (250, 214, 172)),
}
# How bright the ground is under each sky.
SKY_LIGHT = {"day": 1.0, "noon": 1.05, "dusk": 0.62, "overcast": 0.82, "morning": 0.9}


@dataclass(frozen=True)
class Scene:
    sky: str
    scenery: str  # hills | city | trees | mountains
    lanes: int
    yellow_edges: bool
    posts: bool


SCENES = (
    Scene("day", "hills", 2, False, True),
    Scene("dusk", "city", 3, False, False),
    Scene("overcast", "trees", 2, True, True),
    Scene("noon", "mountains", 2, False, False),
    Scene("morning", "trees", 3, False, True),
    Scene("dusk", "hills", 2, True, False),
    Scene("day", "city", 2, False, True),
    Scene("overcast", "mountains", 3, False, True),
    Scene("noon", "trees", 2, True, False),  # the wide one
)


@dataclass(frozen=True)
class Road:
    """A straight road in perspective: edges meet at the vanishing point (vx, horizon)."""

    vx: float
    horizon: float
    bottom: float  # image height: y of the nearest visible road row
    left: float  # x of the left road edge at the bottom row
    right: float

    def at(self, frac: float, t: float) -> Point:
        """Point on the line `frac` of the way across the road, at depth t (0 far .. 1 near)."""
        xb = self.left + (self.right - self.left) * frac
        return self.vx + (xb - self.vx) * t, self.horizon + (self.bottom - self.horizon) * t


def strip(road: Road, frac: float, t0: float, t1: float, width: float) -> list[Point]:
    """Quad for a painted line segment between depths t0 and t1 (width scales with depth)."""
    (x0, y0), (x1, y1) = road.at(frac, t0), road.at(frac, t1)
    w0, w1 = width * t0 / 2, width * t1 / 2
    return [(x0 - w0, y0), (x0 + w0, y0), (x1 + w1, y1), (x1 - w1, y1)]


def draw_sky(rng: np.random.Generator, w: int, h: int, horizon: int, sky: str) -> np.ndarray:
    top, bottom = (jitter(rng, c, 12) for c in SKIES[sky])
    img = vertical_gradient(h, w, top, bottom)
    if sky in ("day", "noon", "overcast"):
        img = add_clouds(rng, img, horizon, dense=sky == "overcast")
    if sky in ("dusk", "morning"):
        img = add_sun(rng, img, horizon)
    return img


def add_clouds(rng: np.random.Generator, img: np.ndarray, horizon: int, dense: bool) -> np.ndarray:
    h, w, _ = img.shape
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(6, 10) if dense else rng.integers(2, 5))):
        cx, cy = rng.uniform(0, w), rng.uniform(0.05, 0.75) * horizon
        for _ in range(int(rng.integers(3, 7))):
            rx, ry = rng.uniform(0.04, 0.12) * w, rng.uniform(0.02, 0.05) * h
            ox, oy = rng.normal(0, 0.06 * w), rng.normal(0, 0.01 * h)
            shade = int(rng.integers(150, 230))
            draw.ellipse((cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry), fill=shade)
    alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(w * 0.012)), float)[..., None] / 255
    cloud = np.array([236.0, 238.0, 242.0]) if not dense else np.array([210.0, 212.0, 218.0])
    return img * (1 - alpha) + cloud * alpha


def add_sun(rng: np.random.Generator, img: np.ndarray, horizon: int) -> np.ndarray:
    h, w, _ = img.shape
    cx, cy = rng.uniform(0.15, 0.85) * w, horizon * rng.uniform(0.55, 0.85)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(xx - cx, yy - cy) / w
    glow = np.exp(-((dist / 0.18) ** 2))[..., None] * 0.55
    disc = np.clip((0.045 - dist) / 0.004, 0, 1)[..., None]
    sun = np.array([255.0, 236.0, 190.0])
    img = img * (1 - glow) + sun * glow
    return img * (1 - disc) + sun * disc


def draw_ground(rng: np.random.Generator, img: np.ndarray, horizon: int, sky: str) -> None:
    h, w, _ = img.shape
    light = SKY_LIGHT[sky]
    near = scale_colour(jitter(rng, (78, 122, 52), 14), light)
    far = mix(scale_colour(jitter(rng, (120, 140, 80), 12), light), SKIES[sky][1], 0.35)
    ground = vertical_gradient(h - horizon, w, far, near)
    blotches = smooth_noise(rng, h - horizon, w, 9)[..., None]
    tufts = smooth_noise(rng, h - horizon, w, 60)[..., None]
    img[horizon:] = ground * (1 + 0.10 * blotches + 0.05 * tufts)


def haze(colour: Sequence[float], sky: str, amount: float) -> RGB:
    return mix(scale_colour(colour, SKY_LIGHT[sky]), SKIES[sky][1], amount)


def ridge(rng: np.random.Generator, w: int, base: float, amp: float, waves: int) -> list[Point]:
    """A wavy silhouette line across the image: sum of a few random sines."""
    xs = np.linspace(0, w, 64)
    ys = np.full_like(xs, base)
    for k in range(1, waves + 1):
        ys -= amp / k * np.sin(2 * np.pi * k * xs / w * rng.uniform(0.6, 1.4) + rng.uniform(0, 6))
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def draw_hills(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, horizon: int, sky: str
) -> None:
    for depth, colour in ((0.55, (70, 110, 70)), (0.25, (60, 105, 45))):
        amp = horizon * rng.uniform(0.08, 0.16)
        line = ridge(rng, w, horizon - amp * (1.5 + depth), amp, 3)
        draw.polygon([*line, (w, horizon + 1), (0, horizon + 1)], fill=haze(colour, sky, depth))


def draw_mountains(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, horizon: int, sky: str
) -> None:
    x = -rng.uniform(0, 0.2) * w
    while x < w:
        half = rng.uniform(0.12, 0.25) * w
        peak = horizon - rng.uniform(0.35, 0.7) * horizon
        px = x + half
        rock = haze((95, 100, 115), sky, 0.45)
        draw.polygon([(x, horizon + 1), (px, peak), (x + 2 * half, horizon + 1)], fill=rock)
        snow_y = peak + (horizon - peak) * 0.22
        snow = haze((240, 242, 248), sky, 0.15)
        draw.polygon(
            [
                (px, peak),
                (px + half * 0.22, snow_y),
                (px + half * 0.05, snow_y - 2),
                (px - half * 0.1, snow_y + 3),
                (px - half * 0.22, snow_y),
            ],
            fill=snow,
        )
        x += half * rng.uniform(0.9, 1.6)
    draw_hills_foreground(draw, rng, w, horizon, sky)


def draw_hills_foreground(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, horizon: int, sky: str
) -> None:
    amp = horizon * 0.05
    line = ridge(rng, w, horizon - amp * 1.2, amp, 2)
    draw.polygon([*line, (w, horizon + 1), (0, horizon + 1)], fill=haze((65, 95, 55), sky, 0.3))


def draw_city(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, horizon: int, sky: str
) -> None:
    lit = sky == "dusk"
    for depth in (0.55, 0.25):
        x = -rng.uniform(0, 10)
        while x < w:
            bw = rng.uniform(0.05, 0.12) * w
            top = horizon - rng.uniform(0.15, 0.6 if depth > 0.5 else 0.4) * horizon
            base = jitter(rng, rng.choice([(120, 115, 110), (150, 140, 125), (95, 100, 110)]), 15)
            draw.rectangle((x, top, x + bw, horizon + 1), fill=haze(base, sky, depth))
            draw_windows(draw, rng, (x, top, x + bw, horizon), lit, sky, depth)
            x += bw + rng.uniform(0, 0.02) * w


def draw_windows(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    box: tuple[float, float, float, float],
    lit: bool,
    sky: str,
    depth: float,
) -> None:
    x0, y0, x1, y1 = box
    step = max(4.0, (x1 - x0) / 5)
    dark = haze((60, 65, 80), sky, depth)
    glow = (250, 215, 120)
    for wy in np.arange(y0 + step * 0.6, y1 - step, step):
        for wx in np.arange(x0 + step * 0.5, x1 - step * 0.6, step):
            colour = glow if lit and rng.random() < 0.45 else dark
            draw.rectangle((wx, wy, wx + step * 0.45, wy + step * 0.5), fill=colour)


def draw_trees(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, horizon: int, sky: str
) -> None:
    far = haze((50, 85, 50), sky, 0.45)
    line = ridge(rng, w, horizon - horizon * 0.08, horizon * 0.03, 4)
    draw.polygon([*line, (w, horizon + 1), (0, horizon + 1)], fill=far)
    for _ in range(int(rng.integers(18, 30))):
        cx = rng.uniform(0, w)
        r = rng.uniform(0.025, 0.06) * w
        trunk = r * rng.uniform(0.6, 1.1)
        cy = horizon - trunk - r * 0.6
        green = haze(jitter(rng, (45, 90, 40), 18), sky, rng.uniform(0.05, 0.3))
        draw.rectangle(
            (cx - r * 0.12, cy, cx + r * 0.12, horizon + 1), fill=haze((70, 55, 40), sky, 0.2)
        )
        draw.ellipse((cx - r, cy - r * 1.2, cx + r, cy + r * 0.8), fill=green)


SCENERY = {"hills": draw_hills, "city": draw_city, "trees": draw_trees, "mountains": draw_mountains}


def make_road(rng: np.random.Generator, w: int, h: int, horizon: int) -> Road:
    vx = rng.uniform(0.3, 0.7) * w
    centre = vx + rng.uniform(-0.25, 0.25) * w
    half = rng.uniform(0.35, 0.75) * w
    return Road(vx, horizon, h, centre - half, centre + half)


def draw_road(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, road: Road, scene: Scene, scale: float
) -> None:
    verge = jitter(rng, (150, 135, 105), 15)
    asphalt = scale_colour(grey(rng, 64, 92), SKY_LIGHT[scene.sky] ** 0.5)
    widen = (road.right - road.left) * rng.uniform(0.05, 0.12)
    verge_road = Road(road.vx, road.horizon, road.bottom, road.left - widen, road.right + widen)
    draw.polygon(
        [verge_road.at(0, 1), verge_road.at(1, 1), (road.vx, road.horizon)],
        fill=scale_colour(verge, SKY_LIGHT[scene.sky]),
    )
    draw.polygon([road.at(0, 1), road.at(1, 1), (road.vx, road.horizon)], fill=asphalt)

    line_w = (road.right - road.left) * 0.018
    edge = (225, 190, 60) if scene.yellow_edges else (225, 225, 220)
    for frac in (0.03, 0.97):
        draw.polygon(strip(road, frac, 0.0, 1.0, line_w), fill=edge)
    dash_len, period = rng.uniform(0.15, 0.3), rng.uniform(0.45, 0.7)
    for lane in range(1, scene.lanes):
        draw_dashes(
            draw, road, lane / scene.lanes, line_w, dash_len, period, rng.uniform(0, period)
        )
    if scene.posts:
        draw_posts(draw, verge_road, scale, period * 2.2)


def draw_dashes(
    draw: ImageDraw.ImageDraw,
    road: Road,
    frac: float,
    width: float,
    dash_len: float,
    period: float,
    phase: float,
) -> None:
    """Dashes equally spaced in world distance z, drawn at depth t = 1 / z."""
    z = 1.0 - phase
    while 1 / (z + dash_len) > 0.015:
        t_near, t_far = min(1.0, 1 / max(z, 1e-6)), 1 / (z + dash_len)
        if t_near > t_far:
            draw.polygon(strip(road, frac, t_far, t_near, width), fill=(235, 235, 230))
        z += period


def draw_posts(draw: ImageDraw.ImageDraw, verge: Road, scale: float, period: float) -> None:
    """White roadside posts with a red reflector on both verges."""
    z = 1.15
    while 1 / z > 0.04:
        t = 1 / z
        for frac in (-0.01, 1.01):
            x, y = verge.at(frac, t)
            height, half = 34 * scale * t, max(0.6, 2.2 * scale * t)
            draw.rectangle((x - half, y - height, x + half, y), fill=(232, 232, 228))
            draw.rectangle((x - half, y - height, x + half, y - height * 0.8), fill=(200, 40, 30))
        z += period


def add_texture(rng: np.random.Generator, img: np.ndarray, road_mask: np.ndarray) -> np.ndarray:
    """Mild grain everywhere, a little more on the asphalt, plus soft light variation."""
    h, w, _ = img.shape
    grain = rng.normal(0, 2.2, (h, w, 1)) + rng.normal(0, 1.0, (h, w, 3))
    grain += rng.normal(0, 3.0, (h, w, 1)) * road_mask[..., None]
    light = 1 + 0.04 * smooth_noise(rng, h, w, 5)[..., None]
    return img * light + grain


def render_background(
    rng: np.random.Generator, scene: Scene, width: int, height: int
) -> Image.Image:
    s = SUPERSAMPLE_BG
    w, h = width * s, height * s
    horizon = int(h * rng.uniform(0.36, 0.5))
    sky = draw_sky(rng, w, h, horizon, scene.sky)
    draw_ground(rng, sky, horizon, scene.sky)
    canvas = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    SCENERY[scene.scenery](draw, rng, w, horizon, scene.sky)

    road = make_road(rng, w, h, horizon)
    draw_road(draw, rng, road, scene, scale=h / 448)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([road.at(0, 1), road.at(1, 1), (road.vx, horizon)], fill=255)

    small = canvas.resize((width, height), Image.Resampling.LANCZOS)
    road_mask = np.asarray(mask.resize((width, height), Image.Resampling.BILINEAR), float) / 255
    out = add_texture(rng, np.asarray(small, float), road_mask)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def make_near_duplicate(src: Image.Image) -> Image.Image:
    """Resize down and back up and stamp a grey watermark strip across the bottom."""
    size = src.size
    img = src.resize((200, 200), Image.Resampling.LANCZOS)
    img = img.resize(size, Image.Resampling.LANCZOS)
    ImageDraw.Draw(img).rectangle((0, size[1] - 10, size[0], size[1]), fill=(128, 128, 128))
    return img


def write_backgrounds(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, scene in enumerate(SCENES[:8]):
        img = render_background(make_rng(STREAM_BACKGROUND, i), scene, BG_SIZE, BG_SIZE)
        path = out_dir / f"road_{i:02d}.jpg"
        img.save(path, quality=90)
        written.append(path)
    with Image.open(out_dir / "road_03.jpg") as src:
        copy = make_near_duplicate(src.convert("RGB"))
    copy.save(out_dir / "road_03_copy.jpg", quality=70)
    wide = render_background(make_rng(STREAM_BACKGROUND, 8), SCENES[8], 320, 200)
    wide.save(out_dir / "road_08_wide.jpg", quality=90)
    return [*written, out_dir / "road_03_copy.jpg", out_dir / "road_08_wide.jpg"]


# --------------------------------------------------------------------------- cars
# Side profiles are in design units: the car is 100 long, front to the right, y down.


@dataclass(frozen=True)
class CarDesign:
    name: str
    height: float
    body: tuple[Point, ...]
    windows: tuple[tuple[Point, ...], ...]
    wheels: tuple[float, float]
    wheel_r: float
    doors: tuple[float, ...]  # x of door seams
    belt: float  # y of the window line
    sill: float  # y of the bottom of the doors
    headlight: tuple[float, float, float, float]  # x0, y0, x1, y1
    taillight: tuple[float, float, float, float]
    length_px: int  # typical sprite length
    seams: tuple[tuple[Point, Point], ...] = ()  # extra panel lines, e.g. a pickup's bed


# fmt: off
CAR_DESIGNS: dict[str, CarDesign] = {
    "sedan": CarDesign(
        name="sedan", height=38, length_px=90,
        body=((0, 31), (0, 21), (2, 17), (14, 15), (30, 14), (40, 3), (62, 3), (74, 13),
              (93, 16), (100, 20), (100, 31)),
        windows=(((35, 14), (42, 5), (51, 5), (51, 14)),
                 ((53, 14), (53, 5), (61, 5), (71, 14))),
        wheels=(20, 81), wheel_r=8, doors=(52, 73), belt=15, sill=29,
        headlight=(95, 17.5, 99.5, 21), taillight=(0.2, 17.5, 3, 21),
    ),
    "hatchback": CarDesign(
        name="hatchback", height=42, length_px=80,
        body=((0, 34), (0, 21), (2, 17), (11, 5), (18, 3), (58, 3), (74, 16), (95, 19),
              (100, 24), (100, 34)),
        windows=(((9, 16), (15, 6), (34, 6), (34, 16)),
                 ((36, 16), (36, 6), (57, 6), (71, 16))),
        wheels=(18, 82), wheel_r=10, doors=(35, 70), belt=17, sill=31,
        headlight=(95, 19.5, 99.5, 23), taillight=(0.5, 17, 3, 22),
    ),
    "suv": CarDesign(
        name="suv", height=50, length_px=88,
        body=((0, 42), (0, 13), (3, 4), (10, 2), (65, 2), (77, 16), (96, 19), (100, 25),
              (100, 42)),
        windows=(((5, 16), (8, 5), (29, 5), (29, 16)),
                 ((31, 16), (31, 5), (50, 5), (50, 16)),
                 ((52, 16), (52, 5), (64, 5), (73, 16))),
        wheels=(20, 80), wheel_r=11, doors=(30, 51, 74), belt=17, sill=38,
        headlight=(95, 20, 99.5, 25), taillight=(0.2, 10, 3, 20),
    ),
    "van": CarDesign(
        name="van", height=52, length_px=86,
        body=((0, 44), (0, 6), (3, 2), (72, 2), (84, 18), (97, 22), (100, 28), (100, 44)),
        windows=(((4, 18), (4, 7), (24, 7), (24, 18)),
                 ((27, 18), (27, 7), (48, 7), (48, 18)),
                 ((51, 18), (51, 7), (70, 7), (80, 18))),
        wheels=(17, 83), wheel_r=9.5, doors=(26, 50, 82), belt=19, sill=40,
        headlight=(96, 23, 99.5, 27), taillight=(0.2, 8, 3, 22),
    ),
    "pickup": CarDesign(
        name="pickup", height=42, length_px=90,
        # Extra points around the cab's rear wall keep it sharp through corner rounding.
        body=((0, 35), (0, 15), (1, 14.5), (44, 14.5), (45, 14.5), (46, 13.5), (46.5, 10),
              (47.5, 3.5), (48.5, 3), (64, 3), (74, 15), (95, 17), (100, 22), (100, 35)),
        windows=(((50, 14), (51, 5.5), (57, 5.5), (57, 14)),
                 ((59, 14), (59, 5.5), (63, 5.5), (71, 14))),
        wheels=(18, 79), wheel_r=9, doors=(45, 74), belt=15, sill=32,
        headlight=(95, 18, 99.5, 22), taillight=(0.2, 16, 2.5, 22),
        seams=(((1.5, 15.6), (44, 15.6)), ((45.5, 15), (45.5, 30))),
    ),
    "sports": CarDesign(
        name="sports", height=30, length_px=90,
        body=((0, 24), (1, 13), (20, 10), (38, 3), (56, 3), (70, 10), (96, 13), (100, 17),
              (100, 24)),
        windows=(((35, 10), (41, 5), (55, 5), (64, 10.5)),),
        wheels=(18, 82), wheel_r=7.5, doors=(33, 66), belt=11, sill=22,
        headlight=(94, 13.5, 99.5, 16), taillight=(0.5, 12.5, 3, 16),
    ),
    "compact": CarDesign(
        name="compact", height=58, length_px=66,
        body=((0, 48), (0, 22), (4, 9), (14, 4), (62, 4), (80, 22), (96, 26), (100, 32),
              (100, 48)),
        windows=(((8, 22), (15, 9), (38, 9), (38, 22)),
                 ((41, 22), (41, 9), (60, 9), (75, 22))),
        wheels=(20, 80), wheel_r=13, doors=(40, 76), belt=23, sill=44,
        headlight=(95, 27, 99.5, 32), taillight=(0.2, 16, 3.5, 28),
    ),
}
# fmt: on

CAR_COLOURS: tuple[RGB, ...] = (
    (200, 30, 35),
    (30, 70, 160),
    (235, 235, 232),
    (35, 35, 38),
    (150, 155, 160),
    (240, 190, 30),
    (40, 120, 70),
    (230, 110, 30),
    (110, 40, 120),
    (70, 160, 200),
)
SPRITE_KINDS = ("sedan", "hatchback", "suv", "pickup", "motorbike", "van", "sports", "compact")


def chaikin(points: Sequence[Point], rounds: int) -> list[Point]:
    """Round the corners of a closed polygon by Chaikin corner cutting."""
    pts = [tuple(p) for p in points]
    for _ in range(rounds):
        nxt: list[Point] = []
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
            nxt += [
                (0.75 * x0 + 0.25 * x1, 0.75 * y0 + 0.25 * y1),
                (0.25 * x0 + 0.75 * x1, 0.25 * y0 + 0.75 * y1),
            ]
        pts = nxt
    return pts


class Canvas:
    """An RGBA float canvas in design units, drawn at a pixel scale with hard-edged masks."""

    def __init__(self, length_px: float, height: float, supersample: int) -> None:
        self.scale = length_px * supersample / 100
        self.pad = 4 * supersample
        self.size = (int(100 * self.scale) + 2 * self.pad, int(height * self.scale) + 2 * self.pad)
        self.rgba = np.zeros((self.size[1], self.size[0], 4), float)

    def px(self, p: Point) -> Point:
        return self.pad + p[0] * self.scale, self.pad + p[1] * self.scale

    def mask(self, shape: str, coords: Sequence[Point], **kw: float) -> np.ndarray:
        layer = Image.new("L", self.size, 0)
        draw = ImageDraw.Draw(layer)
        pts = [self.px(p) for p in coords]
        if shape == "polygon":
            draw.polygon(pts, fill=255)
        elif shape == "ellipse":
            draw.ellipse([pts[0], pts[1]], fill=255)
        else:  # line
            draw.line(pts, fill=255, width=max(1, int(kw["width"] * self.scale)), joint="curve")
        return np.asarray(layer, float) / 255

    def circle_mask(self, centre: Point, r: float) -> np.ndarray:
        x, y = centre
        return self.mask("ellipse", [(x - r, y - r), (x + r, y + r)])

    def paint(self, mask: np.ndarray, colour: Sequence[float] | np.ndarray) -> None:
        m = mask[..., None]
        self.rgba[..., :3] = self.rgba[..., :3] * (1 - m) + np.asarray(colour, float) * m
        self.rgba[..., 3] = np.maximum(self.rgba[..., 3], mask * 255)

    def y_grid(self) -> np.ndarray:
        """Design-unit y coordinate of every pixel row, as a column (rows, 1)."""
        return ((np.arange(self.size[1]) - self.pad) / self.scale)[:, None]

    def x_grid(self) -> np.ndarray:
        return ((np.arange(self.size[0]) - self.pad) / self.scale)[None, :]

    def image(self) -> Image.Image:
        return Image.fromarray(np.clip(np.round(self.rgba), 0, 255).astype(np.uint8), "RGBA")


def shaded(canvas: Canvas, colour: RGB, top: float, bottom: float, belt: float) -> np.ndarray:
    """Body paint: lighter on top, darker low down, with a highlight just under the belt line."""
    y = canvas.y_grid()
    v = np.clip((y - top) / max(bottom - top, 1), 0, 1)
    factor = 1.12 - 0.38 * v + 0.18 * np.exp(-(((y - belt - 1.5) / 1.6) ** 2))
    rgb = np.asarray(colour, float) * factor[..., None]
    return np.broadcast_to(np.clip(rgb, 0, 255), (*y.shape[:1], canvas.size[0], 3))


def glass(canvas: Canvas, sky_tint: RGB) -> np.ndarray:
    """Window glass: dark at the bottom, sky-tinted at the top, with a diagonal reflection."""
    y, x = canvas.y_grid(), canvas.x_grid()
    base = np.asarray(sky_tint, float)
    v = np.clip((y - y.min()) / 40, 0, 1)[..., None]
    rgb = base * (1 - v) * 0.9 + np.array([25.0, 30.0, 40.0]) * v  # (rows, 1, 3)
    band = ((x + y * 0.8) % 45 < 6)[..., None]  # (rows, cols, 1)
    return np.where(band, rgb * 0.6 + 0.4 * np.array([230.0, 235.0, 240.0]), rgb)


def draw_wheel(canvas: Canvas, centre: Point, r: float, rim: RGB) -> None:
    canvas.paint(canvas.circle_mask(centre, r), (28, 28, 30))
    canvas.paint(canvas.circle_mask(centre, r * 0.62), scale_colour(rim, 0.75))
    canvas.paint(canvas.circle_mask(centre, r * 0.55), rim)
    cx, cy = centre
    for k in range(5):
        a = 2 * math.pi * k / 5 + 0.3
        end = (cx + math.cos(a) * r * 0.52, cy + math.sin(a) * r * 0.52)
        canvas.paint(canvas.mask("line", [centre, end], width=r * 0.12), scale_colour(rim, 0.6))
    canvas.paint(canvas.circle_mask(centre, r * 0.18), scale_colour(rim, 0.85))


def draw_car(design: CarDesign, colour: RGB, rim: RGB, length_px: float) -> Image.Image:
    """Render a car design facing right at SUPERSAMPLE_CAR times the final resolution."""
    d = design
    canvas = Canvas(length_px, d.height, SUPERSAMPLE_CAR)
    wheel_y = d.height - d.wheel_r
    body = canvas.mask("polygon", chaikin(d.body, 3))
    top = min(p[1] for p in d.body)
    canvas.paint(body, shaded(canvas, colour, top, d.sill + 4, d.belt))

    # Bumpers, sill and arches in a darker tone, clipped to the body.
    dark = scale_colour(colour, 0.45) if sum(colour) > 150 else (20, 20, 22)
    y = canvas.y_grid()
    canvas.paint(body * (y > d.sill + (d.height - d.sill) * 0.35), scale_colour(dark, 1.2))
    for wx in d.wheels:
        canvas.paint(body * canvas.circle_mask((wx, wheel_y), d.wheel_r * 1.18), (18, 18, 20))

    window_mask = sum(canvas.mask("polygon", chaikin(w, 1)) for w in d.windows)
    canvas.paint(np.clip(window_mask, 0, 1), glass(canvas, (150, 175, 200)))
    for x in d.doors:
        seam = canvas.mask("line", [(x, d.belt), (x - 1, d.sill)], width=0.45)
        canvas.paint(seam * body, scale_colour(colour, 0.55))
        handle = canvas.mask(
            "polygon",
            [
                (x - 7, d.belt + 2.2),
                (x - 3.5, d.belt + 2.2),
                (x - 3.5, d.belt + 3.2),
                (x - 7, d.belt + 3.2),
            ],
        )
        canvas.paint(handle * body, scale_colour(colour, 0.6))
    for seam in d.seams:
        canvas.paint(canvas.mask("line", seam, width=0.6) * body, scale_colour(colour, 0.5))
    x0, y0, x1, y1 = d.headlight
    canvas.paint(body * canvas.mask("ellipse", [(x0, y0), (x1, y1)]), (255, 245, 200))
    x0, y0, x1, y1 = d.taillight
    canvas.paint(
        body * canvas.mask("polygon", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]), (210, 25, 25)
    )
    for wx in d.wheels:
        draw_wheel(canvas, (wx, wheel_y), d.wheel_r, rim)
    return canvas.image()


def draw_motorbike(
    rng: np.random.Generator, colour: RGB, rim: RGB, length_px: float
) -> Image.Image:
    """A side-view motorbike with a rider, facing right."""
    canvas = Canvas(length_px, 72, SUPERSAMPLE_CAR)
    r, wy = 14, 58
    metal, dark = (175, 178, 185), (30, 30, 34)
    suit = jitter(rng, (40, 45, 60), 20)
    helmet = jitter(rng, (230, 230, 230), 25)
    shape = canvas.mask
    for wx in (17, 83):
        draw_wheel(canvas, (wx, wy), r, rim)
    canvas.paint(shape("line", [(17, wy), (46, 50)], width=3.0), dark)  # swing arm
    canvas.paint(shape("line", [(44, 60), (30, 54), (8, 50)], width=3.0), metal)  # exhaust
    engine = chaikin([(38, 42), (58, 42), (60, 58), (40, 60)], 1)
    canvas.paint(shape("polygon", engine), (70, 72, 78))
    canvas.paint(shape("line", [(72, 30), (83, wy)], width=2.8), metal)  # fork
    canvas.paint(
        shape("polygon", chaikin([(70, 42), (82, 39), (95, 44), (94, 47), (82, 43)], 1)), colour
    )  # front mudguard
    canvas.paint(shape("polygon", chaikin([(6, 40), (22, 35), (26, 42), (10, 45)], 2)), colour)
    canvas.paint(shape("polygon", chaikin([(20, 37), (44, 35), (44, 41), (22, 42)], 2)), dark)
    canvas.paint(
        shape("polygon", chaikin([(40, 36), (47, 29), (64, 29), (70, 37), (58, 42), (42, 42)], 2)),
        colour,
    )  # tank
    canvas.paint(
        shape("polygon", chaikin([(66, 30), (77, 22), (83, 32), (76, 41), (68, 40)], 2)),
        scale_colour(colour, 0.85),
    )  # fairing
    canvas.paint(shape("ellipse", [(78, 28), (84, 35)]), (255, 245, 200))
    canvas.paint(shape("ellipse", [(5, 40), (9, 43)]), (210, 25, 25))
    # Rider: leg, torso, arm, helmet.
    canvas.paint(shape("line", [(34, 36), (52, 37), (50, 52)], width=6.0), suit)
    canvas.paint(shape("polygon", chaikin([(28, 38), (40, 14), (52, 16), (44, 39)], 2)), suit)
    canvas.paint(shape("line", [(48, 19), (60, 26), (70, 27)], width=4.5), suit)
    canvas.paint(shape("line", [(50, 53), (55, 54)], width=3.5), dark)
    canvas.paint(canvas.circle_mask((51, 9), 7.5), helmet)
    canvas.paint(shape("polygon", [(53, 6), (58.5, 7), (58, 11), (53, 11)]), (40, 50, 70))
    return canvas.image()


def downsample_tight(big: Image.Image, factor: int, margin: int) -> Image.Image:
    """Downsample with LANCZOS, then crop to the alpha bounding box plus `margin` pixels."""
    w, h = big.size
    small = big.resize((w // factor, h // factor), Image.Resampling.LANCZOS)
    arr = np.asarray(small).copy()
    arr[arr[..., 3] < 3] = 0  # drop LANCZOS ringing far from the shape; clear hidden colour
    ys, xs = np.nonzero(arr[..., 3])
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    out = np.zeros((y1 - y0 + 2 * margin, x1 - x0 + 2 * margin, 4), np.uint8)
    out[margin:-margin, margin:-margin] = arr[y0:y1, x0:x1]
    return Image.fromarray(out, "RGBA")


def render_vehicle(rng: np.random.Generator, kind: str, length_px: float) -> Image.Image:
    """A finished sprite of the given kind: random colour, random facing, tight alpha box."""
    colour = jitter(rng, CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))], 12)
    rim = grey(rng, 160, 215) if rng.random() < 0.7 else (45, 45, 50)
    if kind == "motorbike":
        big = draw_motorbike(rng, colour, rim, length_px)
    else:
        big = draw_car(CAR_DESIGNS[kind], colour, rim, length_px)
    if rng.random() < 0.5:
        big = big.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return downsample_tight(big, SUPERSAMPLE_CAR, SPRITE_MARGIN)


def write_cars(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, kind in enumerate(SPRITE_KINDS):
        rng = make_rng(STREAM_CAR, i)
        base = 64 if kind == "motorbike" else CAR_DESIGNS[kind].length_px
        img = render_vehicle(rng, kind, base + rng.uniform(-2, 2))
        path = out_dir / f"car_{i:02d}.png"
        img.save(path, optimize=True)
        written.append(path)
    return written


# --------------------------------------------------------------------------- car photos

PHOTO_SPECS: tuple[tuple[str, tuple[int, int], str], ...] = (
    ("sedan", (200, 150), "checkerboard"),
    ("suv", (160, 120), "studio"),
    ("hatchback", (240, 180), "wall"),
    ("pickup", (192, 144), "plain"),
)


def photo_background(rng: np.random.Generator, size: tuple[int, int], style: str) -> np.ndarray:
    w, h = size
    if style == "checkerboard":  # the fake "transparent" pattern of many downloaded images
        yy, xx = np.mgrid[0:h, 0:w]
        cells = ((yy // 10) + (xx // 10)) % 2
        return np.where(cells[..., None] == 0, 255.0, 204.0) * np.ones(3)
    if style == "studio":
        return vertical_gradient(h, w, (235, 235, 238), (170, 170, 175))
    if style == "wall":
        img = vertical_gradient(h, w, jitter(rng, (200, 215, 225), 10), (185, 195, 205))
        img[int(h * 0.72) :] = vertical_gradient(
            h - int(h * 0.72), w, (150, 140, 130), (120, 112, 105)
        )
        return img
    return vertical_gradient(h, w, jitter(rng, (232, 225, 210), 8), (215, 205, 190))


def compose_photo(
    rng: np.random.Generator, kind: str, size: tuple[int, int], style: str
) -> tuple[Image.Image, Image.Image]:
    """A car pasted onto a background, with a soft ground shadow; returns (photo, alpha)."""
    w, h = size
    sprite = render_vehicle(rng, kind, w * rng.uniform(0.62, 0.78))
    sw, sh = sprite.size
    x, y = int((w - sw) / 2 + rng.uniform(-0.06, 0.06) * w), int(h * 0.8 - sh)
    bg = photo_background(rng, size, style)
    bg += rng.normal(0, 2.0, (h, w, 1))

    shadow = Image.new("L", size, 0)
    ImageDraw.Draw(shadow).ellipse((x + sw * 0.05, y + sh - 6, x + sw * 0.95, y + sh + 3), fill=110)
    shade = np.asarray(shadow.filter(ImageFilter.GaussianBlur(3)), float)[..., None] / 255
    photo = Image.fromarray(np.clip(bg * (1 - shade), 0, 255).astype(np.uint8), "RGB")
    photo.paste(sprite, (x, y), sprite)
    alpha = Image.new("L", size, 0)
    alpha.paste(sprite.getchannel("A"), (x, y))
    return photo, alpha


def alpha_to_mask(alpha: Image.Image) -> Image.Image:
    """A binary (0/255) 8-bit mask at MASK_SIZE: white car on black."""
    small = np.asarray(alpha.resize(MASK_SIZE, Image.Resampling.BILINEAR))
    return Image.fromarray(np.where(small >= 128, 255, 0).astype(np.uint8), "L")


def write_photos(photo_dir: Path, mask_dir: Path) -> list[Path]:
    photo_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (kind, size, style) in enumerate(PHOTO_SPECS):
        photo, alpha = compose_photo(make_rng(STREAM_PHOTO, i), kind, size, style)
        photo.save(photo_dir / f"photo_{i:02d}.jpg", quality=90)
        alpha_to_mask(alpha).save(mask_dir / f"photo_{i:02d}.png", optimize=True)
        written += [photo_dir / f"photo_{i:02d}.jpg", mask_dir / f"photo_{i:02d}.png"]
    return written


def main() -> None:
    paths = [
        *write_backgrounds(HERE / "backgrounds"),
        *write_cars(HERE / "cars"),
        *write_photos(HERE / "car_photos", HERE / "car_masks"),
    ]
    for path in paths:
        print(f"{path.relative_to(HERE)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
