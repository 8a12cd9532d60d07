"""How one synthetic scene is drawn and rendered: the cue vocabularies, the rendering constants,
the scene parameters drawn from an image's own uniforms, and the vectorized renderer. Which
category shows which cues, and which image is which, is :mod:`privenc.data.synthetic`.
"""

from __future__ import annotations

import numpy as np

CUE_TYPES = ("shape", "texture", "palette", "layout")
CUE_PROBABILITY = 0.85
"""Each cue is present in an image independently with this probability (at least one always is)."""

SHAPES = ("disk", "square", "triangle", "plus", "ring", "dots", "cross", "bars")
DISTRACTOR_SHAPES = ("half_disk", "corner")
"""Neutral objects drawn in every category: clutter that belongs to no category's vocabulary."""
TEXTURES = tuple(f"{22.5 * k:g}deg" for k in range(8))
PALETTES = ("red", "amber", "lime", "green", "cyan", "azure", "violet", "rose")
LAYOUTS = ("bright-E", "bright-SE", "bright-S", "bright-SW", "bright-W", "bright-NW", "bright-N", "bright-NE")
VOCABULARY = {"shape": SHAPES, "texture": TEXTURES, "palette": PALETTES, "layout": LAYOUTS}

# --- rendering constants, in "unit" coordinates: the image spans [-1, 1] on both axes, so the
# pictures are the same at any resolution (only pixel noise and antialiasing depend on size).
HUE_JITTER = 0.19
"""Palette hue jitter (fraction of the colour wheel, uniform +-); palettes are 1/8 = 0.125 apart,
so neighbouring palettes overlap: colour alone is a noisy cue."""
NUISANCE_AMPLITUDE = 0.06
"""Std of each of the three low-frequency colour waves that mask the coarse cues."""
LAYOUT_JITTER = 0.7
"""Layout direction jitter (radians, uniform +-); layouts are pi/4 apart."""
LAYOUT_SLOPE = (0.08, 0.16)
"""Brightness gained per unit of distance along the layout direction (the image spans 2 units)."""
PIXEL_NOISE = 0.04
BACKGROUND_VALUE = (0.45, 0.75)
"""Background brightness range (HSV value), well above the objects' OBJECT_VALUE."""
TEXTURE_PERIOD = 0.25
"""Grating period (unit coordinates: 4.5 px at 36 px, far below the Naive Blur box width)."""
TEXTURE_AMPLITUDE = (0.04, 0.09)
TEXTURE_JITTER = 0.12
"""Orientation jitter (radians, uniform +-); orientations are pi/8 apart."""
OBJECT_RADIUS = (0.24, 0.31)
"""Object size range (unit coordinates: a radius of 4.3-5.6 px at 36 px)."""
CUE_OBJECTS = (2, 3)
"""How many objects of the category's shape an image shows (inclusive range) when the cue is present."""
OBJECT_VALUE = (0.0, 0.2)
GRID_STEP = 0.55
"""Spacing of the 3x3 grid of object positions (unit coordinates), jittered by +-0.08."""
MAX_DISTRACTORS = 1
"""Neutral distractor objects per image: 0 to this many (cue objects + distractors <= 9 grid cells)."""


# --------------------------------------------------------------------------- scene parameters
#
# Every image draws a fixed number of uniforms from its own generator (then its pixel noise); the
# parameters below are functions of those uniforms, computed for a whole batch at once. The
# draws are consumed in a fixed order whatever is present, so forcing a cue on or off changes
# only that cue.

_PRESENCE_DRAWS = len(CUE_TYPES) + 1


class _Draws:
    """Hands out consecutive columns of a (B, K) block of uniforms."""

    def __init__(self, uniforms: np.ndarray) -> None:
        self.uniforms, self.used = uniforms, 0

    def __call__(self, n: int | None = None, low: float = 0.0, high: float = 1.0) -> np.ndarray:
        k = 1 if n is None else n
        u = self.uniforms[:, self.used:self.used + k]
        self.used += k
        u = low + (high - low) * u
        return u[:, 0] if n is None else u  # (B,) or (B, n)


def _presence(head: np.ndarray) -> np.ndarray:
    """(B, 5) first uniforms -> (B, cue type) bool: each cue present with CUE_PROBABILITY, and
    one cue, picked by the fifth uniform, forced on when all four came out absent."""
    present = head[:, :len(CUE_TYPES)] < CUE_PROBABILITY
    pick = np.minimum((head[:, len(CUE_TYPES)] * len(CUE_TYPES)).astype(int), len(CUE_TYPES) - 1)
    none = ~present.any(axis=1)
    present[none, pick[none]] = True
    return present


def _scene(uniforms: np.ndarray, values: np.ndarray, forced: np.ndarray | None) -> dict[str, np.ndarray]:
    """Uniforms (B, _DRAWS) and cue values (B, cue type) -> batched scene parameters."""
    draw = _Draws(uniforms)
    present = _presence(draw(_PRESENCE_DRAWS))
    if forced is not None:
        present = np.broadcast_to(forced, present.shape)
    has_shape, has_texture, has_palette, has_layout = present.T
    shape, texture, palette, layout = values.T
    p: dict[str, np.ndarray] = {}

    # palette: background colour; a random, barely saturated colour when the cue is absent
    hue = palette / len(PALETTES) + draw(low=-HUE_JITTER, high=HUE_JITTER)
    sat, val = draw(low=0.35, high=0.65), draw(low=BACKGROUND_VALUE[0], high=BACKGROUND_VALUE[1])
    random_hue, random_sat = draw(), draw(low=0.0, high=0.12)
    p["background"] = np.stack([np.where(has_palette, hue, random_hue), np.where(has_palette, sat, random_sat), val], 1)

    # low-frequency colour waves: nuisance that masks palette and layout (and survives blur)
    angle, freq = draw(3, 0, 2 * np.pi), draw(3, 0.25, 0.6)  # freq in cycles per unit: 0.5-1.2 per image
    p["wave_vector"] = np.stack([np.cos(angle) * freq, np.sin(angle) * freq], axis=2)  # (B, wave, 2)
    p["wave_phase"] = draw(3, 0, 2 * np.pi)
    p["wave_amplitude"] = draw(9, -1, 1).reshape(-1, 3, 3) * NUISANCE_AMPLITUDE * np.sqrt(3)  # (B, wave, channel)

    # texture: luminance grating at the category's orientation
    theta = np.pi * texture / len(TEXTURES) + draw(low=-TEXTURE_JITTER, high=TEXTURE_JITTER)
    period = TEXTURE_PERIOD * draw(low=0.9, high=1.1)
    phase, amp = draw(low=0, high=2 * np.pi), draw(low=TEXTURE_AMPLITUDE[0], high=TEXTURE_AMPLITUDE[1]) * has_texture
    p["texture"] = np.stack([np.cos(theta) / period, np.sin(theta) / period, phase, amp], 1)

    # layout: luminance ramp brightening towards the category's direction (y points down)
    phi = 2 * np.pi * layout / len(LAYOUTS) + draw(low=-LAYOUT_JITTER, high=LAYOUT_JITTER)
    slope = draw(low=LAYOUT_SLOPE[0], high=LAYOUT_SLOPE[1]) * has_layout
    p["layout"] = np.stack([np.cos(phi) * slope, np.sin(phi) * slope], 1)

    # objects: cue shapes (first slots) and distractors (last slots) on distinct cells of a
    # jittered 3x3 grid; dark silhouettes (one polarity: shapes are learned twice as fast) of a
    # random hue, so that they carry no palette information
    lo, hi = CUE_OBJECTS
    n_cue = lo + (draw() * (hi - lo + 1)).astype(int)
    n_distractor = (draw() * (MAX_DISTRACTORS + 1)).astype(int)
    distractor = len(SHAPES) + (draw(MAX_DISTRACTORS) * len(DISTRACTOR_SHAPES)).astype(int)
    slots = hi + MAX_DISTRACTORS
    cells = np.argsort(draw(9), axis=1)[:, :slots]
    slot = np.arange(slots)
    kind = np.where((slot < n_cue[:, None]) & has_shape[:, None], shape[:, None], -1)
    kind[:, hi:] = np.where(slot[hi:] - hi < n_distractor[:, None], distractor, -1)
    centre = (GRID_STEP * np.stack([cells % 3 - 1, cells // 3 - 1], axis=2)
              + draw(2 * slots, -0.08, 0.08).reshape(-1, slots, 2))
    radius, rotation = draw(slots, *OBJECT_RADIUS), draw(slots, -0.2, 0.2)
    obj_val = draw(slots, *OBJECT_VALUE)
    obj_hue, obj_sat = draw(slots), draw(slots, 0.0, 0.5)
    obj_hsv = np.stack([obj_hue, obj_sat, obj_val], axis=2)
    p["object_kind"] = kind
    p["object_geometry"] = np.concatenate([centre, radius[..., None], rotation[..., None]], axis=2)  # (B, slot, 4)
    p["object_colour"] = _hsv_to_rgb(obj_hsv)  # (B, slot, 3)
    assert draw.used <= _DRAWS, f"a scene needs {draw.used} draws, more than _DRAWS = {_DRAWS}"
    return p


_DRAWS = 128
"""Uniforms drawn per image, at least as many as :func:`_scene` consumes (checked there)."""


# --------------------------------------------------------------------------- rendering


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) HSV in [0, 1] (hue wraps) -> (..., 3) RGB in [0, 1]."""
    h, s, v = hsv[..., 0:1] % 1.0, hsv[..., 1:2], hsv[..., 2:3]
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _wave(x: np.ndarray, y: np.ndarray, fx: np.ndarray, fy: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """cos(2 pi (fx x + fy y) + phase) for (B,) frequencies, as a (B, S, S) float32 plane;
    separable (cosines of rows and columns only), which is much faster than a cosine per pixel."""
    a = 2 * np.pi * fx[:, None, None] * x.astype(float) + phase[:, None, None]  # (B, 1, S)
    b = 2 * np.pi * fy[:, None, None] * y.astype(float)  # (B, S, 1)
    f32 = np.float32
    return np.cos(a).astype(f32) * np.cos(b).astype(f32) - np.sin(a).astype(f32) * np.sin(b).astype(f32)


def _render(p: dict[str, np.ndarray], noise: np.ndarray, size: int) -> np.ndarray:
    """Batched parameters -> (B, size, size, 3) uint8. Element-wise maths only, so an image does
    not depend on the batch it is rendered in."""
    u = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    x, y = u[None, None, :], u[None, :, None]  # (1, 1, S) columns, (1, S, 1) rows

    def col(a: np.ndarray) -> np.ndarray:  # (B,) -> (B, 1, 1)
        return a[:, None, None].astype(np.float32)

    # luminance: layout ramp + texture grating, the same in the three channels
    lum = col(p["layout"][:, 0]) * x + col(p["layout"][:, 1]) * y  # (B, S, S)
    tex = p["texture"]
    lum = lum + col(tex[:, 3]) * _wave(x, y, tex[:, 0], tex[:, 1], tex[:, 2])

    image = _hsv_to_rgb(p["background"]).astype(np.float32)[:, None, None, :] + lum[..., None]  # (B, S, S, 3)
    for w in range(p["wave_phase"].shape[1]):
        wave = _wave(x, y, p["wave_vector"][:, w, 0], p["wave_vector"][:, w, 1], p["wave_phase"][:, w])
        image += wave[..., None] * p["wave_amplitude"][:, None, None, w, :].astype(np.float32)

    # objects, painted in slot order with 1-px antialiased edges
    pixels_per_unit = size / 2.0
    alpha = np.empty(image.shape[:3], np.float32)
    for slot in range(p["object_kind"].shape[1]):  # painted in slot order
        kinds = p["object_kind"][:, slot]
        alpha[:] = 0.0
        for kind in np.unique(kinds[kinds >= 0]):
            sel = np.flatnonzero(kinds == kind)
            cx, cy, r, rot = (col(p["object_geometry"][sel, slot, j]) for j in range(4))
            dx, dy = (x - cx) / r, (y - cy) / r
            c, s = np.cos(rot), np.sin(rot)
            lx, ly = c * dx + s * dy, c * dy - s * dx  # object-local coordinates, radius ~1
            distance = _SDF[kind](lx, ly) * (r * pixels_per_unit)  # in pixels
            alpha[sel] = np.clip(0.5 - distance, 0.0, 1.0)
        colour = p["object_colour"][:, slot].astype(np.float32)[:, None, None, :]
        image += (colour - image) * alpha[..., None]

    image += np.float32(PIXEL_NOISE) * noise
    assert image.dtype == np.float32
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


# Signed distances (approximate; negative inside) of the shapes in local coordinates, radius ~1.
# The vocabulary shapes have nearly equal areas (2.0 +- 0.3 squared radii), so that a blurred
# image does not reveal the shape through the amount of dark ink.
def _box(x, y, hx, hy):
    return np.maximum(np.abs(x) - hx, np.abs(y) - hy)


def _polygon(x, y, normals_deg, offset):
    """Convex polygon as the intersection of half-planes with these outward normals."""
    d = None
    for t in np.deg2rad(normals_deg):
        e = np.float32(np.cos(t)) * x + np.float32(np.sin(t)) * y
        d = e if d is None else np.maximum(d, e)
    return d - offset


_DIAG = np.float32(np.sqrt(0.5))
_SDF = [
    lambda x, y: np.sqrt(x * x + y * y) - 0.8,  # disk
    lambda x, y: _box(x, y, 0.72, 0.72),  # square
    lambda x, y: _polygon(x, y - 0.31, [90, 210, 330], 0.62),  # triangle, apex up
    lambda x, y: np.minimum(_box(x, y, 0.3, 1.0), _box(x, y, 1.0, 0.3)),  # plus
    lambda x, y: np.abs(np.sqrt(x * x + y * y) - 0.72) - 0.24,  # ring
    lambda x, y: np.minimum(np.sqrt((x + 0.66) ** 2 + y * y), np.sqrt((x - 0.66) ** 2 + y * y)) - 0.52,  # dots
    lambda x, y: np.minimum(_box(_DIAG * (x + y), _DIAG * (x - y), 0.28, 1.05),
                            _box(_DIAG * (x + y), _DIAG * (x - y), 1.05, 0.28)),  # cross
    lambda x, y: _box(x, np.abs(y) - 0.5, 0.95, 0.25),  # bars
    lambda x, y: np.maximum(np.sqrt(x * x + (y - 0.35) ** 2) - 0.95, y - 0.35),  # half_disk
    lambda x, y: np.minimum(_box(x + 0.55, y, 0.22, 0.9), _box(x, y - 0.68, 0.77, 0.22)),  # corner
]
