"""Synthetic photo-EMA cohort with known personal environments and environment types.

Each environment type is a procedural scene template. It fixes a layout of horizontal
bands with one texture kind per band (stripes, checker, dots, grid, waves, bricks), an
optional perspective floor, an optional vertical split, a palette family and a kind of
object.
Each participant owns a few personal environments, each a concrete instance of one type
with its own band positions and tilt, texture frequency, orientation and phase, colours
inside the type's palette, object placement and one large landmark shape. The
environments therefore differ in layout and texture structure, which survives the
colour jitter and grayscale of contrastive augmentation, and not only in colour.

A photo is a view of its environment. The scene is rendered once on a canvas twice the
photo size. Each photo then takes a rotated, shifted and zoomed crop, so views of one
environment overlap, and applies a brightness, contrast and colour-temperature change, an
optional Gaussian blur and sensor noise. Only numpy and Pillow are used, and the
output is a deterministic function of the arguments (for a fixed numpy and Pillow).
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MANIFEST_NAME = "labels.csv"
IMAGES_DIR = "images"
# Written last with the arguments. Its presence with equal arguments marks a complete cohort.
MARKER_NAME = "cohort.json"
# Present while a generation is running or after one was interrupted.
PARTIAL_MARKER_NAME = ".cohort.partial"
STAGING_DIR = ".cohort.staging"
# Bump when the rendering changes, so that an older cohort on disk is regenerated.
FORMAT_VERSION = 1

TEXTURE_KINDS = ("stripes", "checker", "dots", "grid", "waves", "bricks")
OBJECT_KINDS = ("box", "disc", "ring", "triangle", "window", "bars")

# Probability that a participant gets a second environment of a type they already have,
# applied only where every type keeps at least two participants afterwards.
_DUPLICATE_TYPE_PROBABILITY = 0.25


@dataclasses.dataclass(frozen=True)
class _BandStyle:
    """Texture and palette of one scene region, shared by all environments of a type."""

    texture: str
    frequency: float  # texture cycles across the canvas width
    angle: float  # texture orientation in radians
    hue: float  # in [0, 1)
    saturation: float
    value: float  # brightness of the lighter texture colour
    contrast: float  # value gap between the two texture colours


@dataclasses.dataclass(frozen=True)
class _TypeTemplate:
    """Structure shared by every personal environment of one environment type."""

    name: str
    boundaries: tuple[float, ...]  # band edges as fractions of the canvas height
    bands: tuple[_BandStyle, ...]  # one per band, top to bottom
    perspective_floor: bool  # the bottom band recedes to a vanishing line
    split_band: int  # index of the band cut by a vertical split, -1 for none
    split_style: _BandStyle  # texture right of the split
    object_kind: str
    object_count: tuple[int, int]  # inclusive range
    object_size: tuple[float, float]  # fraction of the canvas width
    object_hue: float


def make_cohort(
    out_dir: str,
    *,
    num_participants: int,
    num_types: int,
    envs_per_participant: int,
    photos_per_env: int,
    image_size: int,
    seed: int,
) -> str:
    """Generate a synthetic cohort under out_dir and return the path of its labels.csv.

    Writes out_dir/images/<participant>/<environment>/<n>.png (image_size x image_size
    RGB) and out_dir/labels.csv with columns path (relative to out_dir/images),
    participant, environment and environment_type. Participants are p00, p01, ...;
    environment types are type00, type01, ...; an environment's folder name and label
    is <participant>_env<j>_<type>, such as p03_env1_type02, so that the label is unique
    across the whole cohort and folder-mode discovery yields the same label.

    Every type is used by at least one environment. When num_participants >= 2 and
    num_participants * envs_per_participant >= 2 * num_types, every type is used by at
    least two participants. A participant may own two environments of one type.

    make_cohort owns out_dir/images, out_dir/labels.csv and its marker files. A second
    call with the same arguments returns at once without writing. A call with other
    arguments, or after an interrupted call, replaces the earlier output. It raises
    FileExistsError rather than overwrite an images folder or labels.csv that it did not
    write.
    """
    arguments = {
        "format_version": FORMAT_VERSION,
        "num_participants": num_participants,
        "num_types": num_types,
        "envs_per_participant": envs_per_participant,
        "photos_per_env": photos_per_env,
        "image_size": image_size,
        "seed": seed,
    }
    _validate_arguments(arguments)

    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    marker_path = os.path.join(out_dir, MARKER_NAME)
    partial_path = os.path.join(out_dir, PARTIAL_MARKER_NAME)
    images_path = os.path.join(out_dir, IMAGES_DIR)

    if _read_marker(marker_path) == arguments and os.path.isfile(manifest_path):
        return manifest_path

    owned = os.path.exists(marker_path) or os.path.exists(partial_path)
    if not owned and (os.path.exists(images_path) or os.path.exists(manifest_path)):
        raise FileExistsError(
            f"{out_dir} already contains {IMAGES_DIR}/ or {MANIFEST_NAME} that make_cohort "
            f"did not write ({MARKER_NAME} is missing). Choose an empty output folder or "
            "delete them."
        )

    os.makedirs(out_dir, exist_ok=True)
    with open(partial_path, "w", encoding="utf-8") as handle:
        json.dump(arguments, handle)
    if os.path.exists(marker_path):
        os.remove(marker_path)

    staging_path = os.path.join(out_dir, STAGING_DIR)
    if os.path.exists(staging_path):
        shutil.rmtree(staging_path)
    _generate(staging_path, **{k: v for k, v in arguments.items() if k != "format_version"})

    if os.path.exists(images_path):
        shutil.rmtree(images_path)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    os.replace(os.path.join(staging_path, IMAGES_DIR), images_path)
    os.replace(os.path.join(staging_path, MANIFEST_NAME), manifest_path)
    os.rmdir(staging_path)

    temporary_marker = marker_path + ".tmp"
    with open(temporary_marker, "w", encoding="utf-8") as handle:
        json.dump(arguments, handle, indent=1, sort_keys=True)
    os.replace(temporary_marker, marker_path)
    os.remove(partial_path)
    return manifest_path


def _validate_arguments(arguments: dict) -> None:
    for name, value in arguments.items():
        if name == "seed":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"make_cohort: {name} must be a positive integer, got {value!r}.")
    if not isinstance(arguments["seed"], int) or arguments["seed"] < 0:
        raise ValueError(
            f"make_cohort: seed must be a non-negative integer, got {arguments['seed']!r}."
        )
    if arguments["image_size"] < 16:
        raise ValueError(
            f"make_cohort: image_size must be at least 16 pixels, got {arguments['image_size']}."
        )
    slots = arguments["num_participants"] * arguments["envs_per_participant"]
    if arguments["num_types"] > slots:
        raise ValueError(
            f"make_cohort: num_types={arguments['num_types']} exceeds the "
            f"{slots} environments in the cohort, so some types would have no environment. "
            "Lower num_types or raise num_participants or envs_per_participant."
        )


def _read_marker(marker_path: str) -> dict | None:
    try:
        with open(marker_path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _generate(
    staging_path: str,
    *,
    num_participants: int,
    num_types: int,
    envs_per_participant: int,
    photos_per_env: int,
    image_size: int,
    seed: int,
) -> None:
    """Write images/ and labels.csv of a cohort under staging_path."""
    templates = [
        _make_type_template(f"type{t:02d}", np.random.default_rng([seed, 0, t]))
        for t in range(num_types)
    ]
    assignment = _assign_types(
        num_participants, num_types, envs_per_participant, np.random.default_rng([seed, 3])
    )
    canvas_size = 2 * image_size
    rows = []
    for p, type_indices in enumerate(assignment):
        participant = f"p{p:02d}"
        for j, t in enumerate(type_indices):
            template = templates[t]
            environment = f"{participant}_env{j}_{template.name}"
            folder = os.path.join(staging_path, IMAGES_DIR, participant, environment)
            os.makedirs(folder)
            scene = _render_scene(template, np.random.default_rng([seed, 1, p, j]), canvas_size)
            for n in range(photos_per_env):
                photo = _take_photo(scene, image_size, np.random.default_rng([seed, 2, p, j, n]))
                photo.save(os.path.join(folder, f"{n}.png"), format="PNG")
                rows.append((f"{participant}/{environment}/{n}.png", participant, environment,
                             template.name))

    with open(os.path.join(staging_path, MANIFEST_NAME), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "participant", "environment", "environment_type"))
        writer.writerows(rows)


def _assign_types(
    num_participants: int, num_types: int, envs_per_participant: int, rng: np.random.Generator
) -> list[list[int]]:
    """Choose the type of each personal environment.

    Each participant first takes the least-used types, breaking ties at random, so type
    counts stay within one of each other. These types are distinct where
    envs_per_participant <= num_types. Then some participants swap one environment for
    a second copy of a type they already own, where the swapped-out type keeps two
    participants.
    """
    counts = np.zeros(num_types, dtype=np.int64)
    assignment = []
    for _ in range(num_participants):
        chosen: list[int] = []
        while len(chosen) < envs_per_participant:
            available = [t for t in range(num_types) if t not in chosen] or list(range(num_types))
            keys = counts[available] + rng.random(len(available))
            t = available[int(np.argmin(keys))]
            chosen.append(t)
            counts[t] += 1
        assignment.append(chosen)

    if envs_per_participant >= 2:
        for chosen in assignment:
            if rng.random() >= _DUPLICATE_TYPE_PROBABILITY:
                continue
            dropped = chosen[-1]
            owners = sum(dropped in other for other in assignment)
            if owners <= 2 or chosen.count(dropped) > 1:
                continue
            chosen[-1] = chosen[int(rng.integers(len(chosen) - 1))]
    return assignment


def _make_band_style(rng: np.random.Generator, texture: str, hue: float) -> _BandStyle:
    return _BandStyle(
        texture=texture,
        frequency=float(rng.uniform(3.0, 10.0)),
        angle=float(rng.uniform(0.0, math.pi)),
        hue=float((hue + rng.uniform(-0.08, 0.08)) % 1.0),
        saturation=float(rng.uniform(0.25, 0.8)),
        value=float(rng.uniform(0.55, 0.95)),
        contrast=float(rng.uniform(0.25, 0.5)),
    )


def _make_type_template(name: str, rng: np.random.Generator) -> _TypeTemplate:
    """Draw the structure of one environment type."""
    hue = float(rng.random())
    num_bands = int(rng.integers(2, 5))
    # Each band covers at least 12% of the height before the per-environment jitter, so
    # that it stays visible in a crop.
    minimum_height = 0.12
    heights = minimum_height + (1.0 - num_bands * minimum_height) * rng.dirichlet(
        np.full(num_bands, 2.0))
    boundaries = (0.0, *(float(b) for b in np.cumsum(heights)[:-1]), 1.0)

    textures = rng.choice(len(TEXTURE_KINDS), size=num_bands + 1)
    bands = tuple(_make_band_style(rng, TEXTURE_KINDS[k], hue) for k in textures[:-1])
    split_style = _make_band_style(rng, TEXTURE_KINDS[textures[-1]], hue + 0.5)
    split_band = int(rng.integers(num_bands)) if rng.random() < 0.6 else -1

    low = int(rng.integers(1, 4))
    size_low = float(rng.uniform(0.06, 0.14))
    return _TypeTemplate(
        name=name,
        boundaries=boundaries,
        bands=bands,
        perspective_floor=bool(rng.random() < 0.5),
        split_band=split_band,
        split_style=split_style,
        object_kind=OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))],
        object_count=(low, low + int(rng.integers(1, 4))),
        object_size=(size_low, size_low + float(rng.uniform(0.04, 0.12))),
        object_hue=float((hue + rng.uniform(0.2, 0.8)) % 1.0),
    )


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(
        colorsys.hsv_to_rgb(hue % 1.0, float(np.clip(saturation, 0, 1)), float(np.clip(value, 0, 1))),
        dtype=np.float32,
    )


def _texture_pattern(
    kind: str, x: np.ndarray, y: np.ndarray, frequency: float, angle: float, phase: np.ndarray
) -> np.ndarray:
    """Return the texture as a mixing weight in [0, 1] at canvas coordinates x, y."""
    a = x * math.cos(angle) + y * math.sin(angle)
    b = -x * math.sin(angle) + y * math.cos(angle)
    fa = frequency * a + phase[0]
    fb = frequency * b + phase[1]
    sharpness = 4.0
    if kind == "stripes":
        signal = np.sin(2 * np.pi * fa)
    elif kind == "checker":
        signal = np.sin(2 * np.pi * fa) * np.sin(2 * np.pi * fb) * 2.0
    elif kind == "dots":
        distance = np.hypot(fa - np.round(fa), fb - np.round(fb))
        signal = (0.28 - distance) * 12.0
    elif kind == "grid":
        distance = np.minimum(np.abs(fa - np.round(fa)), np.abs(fb - np.round(fb)))
        signal = (0.08 - distance) * 20.0
    elif kind == "waves":
        signal = np.sin(2 * np.pi * fa + 1.5 * np.sin(2 * np.pi * 0.5 * fb + phase[2]))
    elif kind == "bricks":
        row = np.floor(2 * fb)
        shifted = 2 * fa + 0.5 * (row % 2)
        mortar = np.minimum(np.abs(2 * fb - np.round(2 * fb)), np.abs(shifted - np.round(shifted)))
        signal = (mortar - 0.07) * 20.0
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    return np.clip(0.5 + sharpness * signal, 0.0, 1.0)


def _paint_texture(
    style: _BandStyle, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Return an RGB texture of one environment's instance of a band style.

    The environment varies the type's frequency (x0.67-1.5), angle (+-30 degrees),
    phase, hue, saturation and value, so that it keeps the type's texture kind.
    """
    frequency = style.frequency * float(np.exp(rng.uniform(-0.4, 0.4)))
    angle = style.angle + float(rng.uniform(-0.52, 0.52))
    phase = rng.random(3)
    hue = style.hue + float(rng.normal(0.0, 0.03))
    saturation = style.saturation + float(rng.uniform(-0.15, 0.15))
    value = style.value + float(rng.uniform(-0.15, 0.1))
    light = _hsv(hue, saturation, value)
    dark = _hsv(hue + float(rng.uniform(-0.05, 0.05)), saturation + 0.1, value - style.contrast)
    weight = _texture_pattern(style.texture, x, y, frequency, angle, phase)[..., None]
    return dark + (light - dark) * weight


def _render_scene(
    template: _TypeTemplate, rng: np.random.Generator, canvas_size: int
) -> Image.Image:
    """Render one personal environment of a type as an RGB canvas."""
    coordinates = (np.arange(canvas_size, dtype=np.float32) + 0.5) / canvas_size
    y, x = np.meshgrid(coordinates, coordinates, indexing="ij")
    canvas = np.zeros((canvas_size, canvas_size, 3), dtype=np.float32)

    # Band edges move by up to 7% of the height and tilt by up to 0.15 per canvas width.
    edges = []
    for i, boundary in enumerate(template.boundaries):
        if i in (0, len(template.boundaries) - 1):
            edges.append(np.full_like(x, boundary * 2 - 0.5))  # -0.5 or 1.5: off the canvas
            continue
        offset = boundary + float(rng.uniform(-0.07, 0.07))
        tilt = float(rng.uniform(-0.15, 0.15))
        edges.append(offset + tilt * (x - 0.5))

    split_x = float(rng.uniform(0.3, 0.7))
    last = len(template.bands) - 1
    for i, style in enumerate(template.bands):
        mask = (y >= edges[i]) & (y < edges[i + 1])
        if template.perspective_floor and i == last and last > 0:
            # Floor coordinates: depth grows towards the band's top edge (the horizon).
            depth = 1.0 / (y - edges[i] + 0.08)
            u, v = (x - 0.5) * depth * 0.25, depth * 0.25
        else:
            u, v = x, y
        texture = _paint_texture(style, u, v, rng)
        canvas = np.where(mask[..., None], texture, canvas)
        if i == template.split_band:
            right = mask & (x >= split_x)
            canvas = np.where(right[..., None], _paint_texture(template.split_style, x, y, rng), canvas)

    image = Image.fromarray(_to_uint8(canvas))
    _draw_objects(image, template, edges, rng)
    _draw_landmark(image, x, y, rng)

    # Light falls off across the scene in an environment-specific direction.
    canvas = np.asarray(image, dtype=np.float32) / 255.0
    direction = rng.uniform(0.0, 2 * math.pi)
    strength = float(rng.uniform(0.1, 0.3))
    shading = 1.0 + strength * ((x - 0.5) * math.cos(direction) + (y - 0.5) * math.sin(direction))
    return Image.fromarray(_to_uint8(canvas * shading[..., None]))


def _draw_objects(
    image: Image.Image, template: _TypeTemplate, edges: list[np.ndarray], rng: np.random.Generator
) -> None:
    """Draw the type's objects, standing on or hanging from a band edge, at random places."""
    size = image.size[0]
    draw = ImageDraw.Draw(image)
    count = int(rng.integers(template.object_count[0], template.object_count[1] + 1))
    num_edges = len(edges) - 2
    for _ in range(count):
        width = float(rng.uniform(*template.object_size)) * size
        height = width * float(rng.uniform(0.6, 1.8))
        left = float(rng.uniform(0.0, size - width))
        centre_column = min(int(left + width / 2), size - 1)
        if num_edges > 0:
            edge = edges[1 + int(rng.integers(num_edges))][0, centre_column] * size
        else:
            edge = size * 0.6
        top = edge - height if rng.random() < 0.7 else edge
        box = (left, top, left + width, top + height)
        fill = tuple(int(c) for c in 255 * _hsv(
            template.object_hue + float(rng.normal(0, 0.04)),
            float(rng.uniform(0.3, 0.9)),
            float(rng.uniform(0.25, 0.95)),
        ))
        outline = tuple(int(c * 0.4) for c in fill)
        line = max(1, size // 64)
        kind = template.object_kind
        if kind == "box":
            draw.rectangle(box, fill=fill, outline=outline, width=line)
        elif kind == "disc":
            draw.ellipse(box, fill=fill, outline=outline, width=line)
        elif kind == "ring":
            draw.ellipse(box, outline=fill, width=max(2, int(width * 0.18)))
        elif kind == "triangle":
            draw.polygon(
                [(left, top + height), (left + width, top + height), (left + width / 2, top)],
                fill=fill, outline=outline,
            )
        elif kind == "window":
            draw.rectangle(box, fill=fill, outline=outline, width=2 * line)
            draw.line([(left + width / 2, top), (left + width / 2, top + height)], fill=outline, width=line)
            draw.line([(left, top + height / 2), (left + width, top + height / 2)], fill=outline, width=line)
        elif kind == "bars":
            bars = int(rng.integers(3, 6))
            step = width / (2 * bars - 1)
            for b in range(bars):
                draw.rectangle((left + 2 * b * step, top, left + (2 * b + 1) * step, top + height), fill=fill)
        else:
            raise ValueError(f"unknown object kind {kind!r}")


def _draw_landmark(
    image: Image.Image, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> None:
    """Paste one large textured polygon that only this environment has."""
    size = image.size[0]
    vertices = int(rng.integers(3, 9))
    radius = float(rng.uniform(0.16, 0.28)) * size
    centre = rng.uniform(0.25, 0.75, size=2) * size
    # Evenly spread, jittered vertex angles keep the polygon from collapsing to a sliver.
    angles = (np.arange(vertices) + rng.uniform(-0.3, 0.3, size=vertices)) * (2 * math.pi / vertices)
    angles = angles + float(rng.uniform(0.0, 2 * math.pi))
    radii = radius * rng.uniform(0.6, 1.0, size=vertices)
    polygon = [
        (float(centre[0] + r * math.cos(a)), float(centre[1] + r * math.sin(a)))
        for a, r in zip(angles, radii)
    ]
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)

    style = _BandStyle(
        texture=TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))],
        frequency=float(rng.uniform(6.0, 14.0)),
        angle=float(rng.uniform(0.0, math.pi)),
        hue=float(rng.random()),
        saturation=float(rng.uniform(0.4, 0.9)),
        value=float(rng.uniform(0.75, 1.0)),
        contrast=float(rng.uniform(0.5, 0.7)),
    )
    fill = Image.fromarray(_to_uint8(_paint_texture(style, x, y, rng)))
    image.paste(fill, (0, 0), mask)
    ImageDraw.Draw(image).polygon(polygon, outline=(20, 20, 20), width=max(1, size // 64))


def _take_photo(scene: Image.Image, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Return one view of a scene: crop, rotation, lighting, blur and noise."""
    canvas_size = scene.size[0]
    # The crop side is 60-85% of the canvas, rotated by up to 7 degrees, so that views of
    # one environment overlap and the rotated crop stays inside the canvas.
    side = float(rng.uniform(0.6, 0.85))
    angle = math.radians(float(rng.uniform(-7.0, 7.0)))
    half_extent = side / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))
    centre_x, centre_y = rng.uniform(half_extent, 1.0 - half_extent, size=2) * canvas_size

    crop_pixels = max(image_size, int(round(side * canvas_size)))
    scale = side * canvas_size / crop_pixels
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    half = crop_pixels / 2
    affine = (
        cos, -sin, centre_x - cos * half + sin * half,
        sin, cos, centre_y - sin * half - cos * half,
    )
    view = scene.transform((crop_pixels, crop_pixels), Image.Transform.AFFINE, affine,
                           resample=Image.Resampling.BILINEAR)
    view = view.resize((image_size, image_size), Image.Resampling.BILINEAR)

    if rng.random() < 0.3:
        view = view.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))

    pixels = np.asarray(view, dtype=np.float32) / 255.0
    contrast = float(rng.uniform(0.75, 1.25))
    brightness = float(rng.uniform(-0.12, 0.12))
    temperature = float(rng.uniform(-0.1, 0.1))
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean + brightness
    pixels = pixels * np.array([1 + temperature, 1.0, 1 - temperature], dtype=np.float32)
    pixels = pixels + rng.normal(0.0, float(rng.uniform(0.004, 0.025)), size=pixels.shape)
    return Image.fromarray(_to_uint8(pixels))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
