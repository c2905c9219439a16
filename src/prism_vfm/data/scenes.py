"""Procedural 3-D scenes rendered by ray casting, with exact per-pixel ground truth.

A pinhole camera a little above the floor looks slightly down into a room (floor, back wall, two side walls)
holding a few textured objects of four classes — box-shaped TVs and tables, cylindrical bottles, spherical
plants — and, in most scenes, an articulated figure made of box and sphere parts (head, torso, upper and lower
arms and legs at random joint angles). Every pixel's nearest surface gives its ground truth exactly: class,
figure part, foreground (saliency), depth (the camera-frame z, metres), surface normal, texture and albedo;
boundaries are where the class labels change. Shading is Lambertian with cast shadows.

Each scene is a function of ``(seed, stream, index)`` only, so a data set is deterministic per seed and any
scene can be re-rendered alone. ``scene_sets.py`` writes them in the release layouts.

Normals follow the convention of the release files: x to the right, y down, z towards the camera (a wall
facing the camera is (0, 0, 1), a floor seen from above has a negative y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-4


@dataclass(frozen=True)
class SceneClass:
    """A class of the scenes with its id in each release: VOC semseg (0 = background), PASCAL-Context
    ``LabelMap`` value, NYU-40 class (1-based, as stored in the NYUD PNGs)."""

    name: str
    voc: int
    context: int
    nyu: int


# The LabelMap values of floor, wall, tvmonitor and person are those of the tiny data sets; the others are
# stand-ins. Readers take the values from the written json/context_classes.json, never from here.
SCENE_CLASSES = (
    SceneClass("floor", 0, 158, 2),
    SceneClass("wall", 0, 440, 1),
    SceneClass("tvmonitor", 20, 427, 25),  # NYU "television"
    SceneClass("diningtable", 11, 112, 7),  # NYU "table"
    SceneClass("bottle", 5, 44, 40),  # NYU "otherprop"
    SceneClass("pottedplant", 16, 258, 39),  # NYU has no plant class; "otherfurniture" stands in
    SceneClass("person", 15, 284, 31),
)
CLASS_INDEX = {c.name: i for i, c in enumerate(SCENE_CLASSES)}
BACKGROUND_CLASSES = frozenset({CLASS_INDEX["floor"], CLASS_INDEX["wall"]})

FIGURE_PARTS = ("head", "torso", "luarm", "ruarm", "llarm", "rlarm", "luleg", "ruleg", "llleg", "rlleg")
"""PASCAL-Part names of the figure's parts; ``Scene.parts`` holds 1 + an index into this tuple (0 = none)."""

TEXTURES = ("plain", "checker", "stripes", "dots", "waves")
"""Surface patterns; ``Scene.texture`` holds an index into this tuple. Objects draw theirs independently of
their class, so texture and class are separate pieces of knowledge."""


@dataclass
class Scene:
    """One rendered scene; every array is (H, W) or (H, W, 3).

    Attributes:
        image: uint8 RGB photo (shaded, shadowed, with sensor noise).
        albedo: float32 surface colour in [0, 1] before shading.
        depth: float32 camera-frame z of the surface, metres.
        normals: float32 unit normals (x right, y down, z towards the camera).
        labels: int64 index into ``SCENE_CLASSES``.
        parts: uint8 1 + index into ``FIGURE_PARTS``, 0 off the figure.
        instance: int32 object id, 0 for floor and walls.
        texture: uint8 index into ``TEXTURES``.
        surface: int32 id of the planar face hit (floor, a wall, a box face, a cylinder top), -1 on curved
            surfaces; neighbours sharing an id lie on one plane.
        focal: focal length in pixels; the principal point is the image centre.
    """

    image: np.ndarray
    albedo: np.ndarray
    depth: np.ndarray
    normals: np.ndarray
    labels: np.ndarray
    parts: np.ndarray
    instance: np.ndarray
    texture: np.ndarray
    surface: np.ndarray
    focal: float

    @property
    def foreground(self) -> np.ndarray:
        """Pixels of objects and the figure (the saliency ground truth)."""
        return self.instance > 0


_Geometry = dict[str, np.ndarray | float]


@dataclass
class _Surface:
    kind: str  # "plane", "box", "sphere", "cylinder"
    geometry: _Geometry
    label: int
    part: int = 0
    instance: int = 0
    texture: int = 0
    colours: np.ndarray | None = None  # (2, 3) in [0, 1]
    scale: float = 0.3  # texture period, metres
    angle: float = 0.0  # texture orientation


# --- ray intersections: origins (3,) or (N, 3), directions (N, 3); each returns t (inf on a miss), world
# normals, 2-D surface coordinates for texturing and a face index (-1 on curved parts) --------------------


def _plane(o: np.ndarray, d: np.ndarray, g: dict) -> tuple[np.ndarray, ...]:
    n, p0 = g["normal"], g["point"]
    denom = d @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((p0 - o) @ n) / denom
    t = np.where((denom < -1e-9) & (t > _EPS), t, np.inf)
    p = o + t[:, None] * d
    rel = np.where(np.isfinite(p), p - p0, 0.0)
    uv = np.stack([rel @ g["u"], rel @ g["v"]], axis=1)
    return t, np.broadcast_to(n, d.shape), uv, np.zeros(len(d), dtype=np.int64)


def _box(o: np.ndarray, d: np.ndarray, g: dict) -> tuple[np.ndarray, ...]:
    rot, half = g["rot"], g["half"]  # columns of rot: the box axes in the world
    ol, dl = (o - g["centre"]) @ rot, d @ rot
    dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    t1, t2 = (-half - ol) / dl, (half - ol) / dl
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = near.argmax(1)
    t_near, t_far = near.max(1), far.min(1)
    t = np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)
    rows = np.arange(len(d))
    sign = -np.sign(dl[rows, axis])
    normal = rot.T[axis] * sign[:, None]
    local = ol + np.where(np.isfinite(t), t, 0.0)[:, None] * dl
    uv = np.stack([local[rows, (axis + 1) % 3], local[rows, (axis + 2) % 3]], axis=1)
    return t, normal, uv, axis * 2 + (sign > 0)


def _sphere(o: np.ndarray, d: np.ndarray, g: dict) -> tuple[np.ndarray, ...]:
    oc, r = o - g["centre"], g["radius"]
    a = np.einsum("ij,ij->i", d, d)
    oc_rays = np.broadcast_to(oc, d.shape)
    b = np.einsum("ij,ij->i", oc_rays, d)
    c = np.einsum("ij,ij->i", oc_rays, oc_rays) - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    t = np.where((disc > 0) & (t > _EPS), t, np.inf)
    n = (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d - g["centre"]) / r
    uv = np.stack([np.arctan2(n[:, 0], n[:, 2]) * r, np.arcsin(np.clip(n[:, 1], -1, 1)) * r], axis=1)
    return t, n, uv, np.full(len(d), -1)


def _cylinder(o: np.ndarray, d: np.ndarray, g: dict) -> tuple[np.ndarray, ...]:
    """A vertical cylinder standing on the floor, with a flat top."""
    base, r, height = g["base"], g["radius"], g["height"]
    oc = np.broadcast_to(o - base, d.shape)
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = oc[:, 0] * d[:, 0] + oc[:, 2] * d[:, 2]
    c = oc[:, 0] ** 2 + oc[:, 2] ** 2 - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        y = oc[:, 1] + side * d[:, 1]
        side = np.where((disc > 0) & (side > _EPS) & (y >= 0) & (y <= height), side, np.inf)
        top = (height - oc[:, 1]) / d[:, 1]
    top_x, top_z = oc[:, 0] + top * d[:, 0], oc[:, 2] + top * d[:, 2]
    top = np.where((d[:, 1] < 0) & (top > _EPS) & (top_x**2 + top_z**2 <= r * r), top, np.inf)
    on_top = top < side
    t = np.minimum(side, top)
    p = oc + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    radial = np.stack([p[:, 0] / r, np.zeros(len(d)), p[:, 2] / r], axis=1)
    normal = np.where(on_top[:, None], np.array([0.0, 1.0, 0.0]), radial)
    uv_side = np.stack([np.arctan2(p[:, 0], p[:, 2]) * r, p[:, 1]], axis=1)
    uv = np.where(on_top[:, None], p[:, [0, 2]], uv_side)
    return t, normal, uv, np.where(on_top, 0, -1)


_INTERSECT = {"plane": _plane, "box": _box, "sphere": _sphere, "cylinder": _cylinder}
_FACES = 6  # face ids per surface in Scene.surface


def _pattern(texture: int, uv: np.ndarray, scale: float, angle: float) -> np.ndarray:
    """Mixing weight in [0, 1] between a surface's two colours."""
    c, s = np.cos(angle), np.sin(angle)
    u = (uv[:, 0] * c + uv[:, 1] * s) / scale
    v = (-uv[:, 0] * s + uv[:, 1] * c) / scale
    name = TEXTURES[texture]
    if name == "plain":
        return np.zeros(len(uv))
    if name == "checker":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    if name == "stripes":
        return (np.sin(2 * np.pi * u) > 0).astype(np.float64)
    if name == "dots":
        return (((u % 1) - 0.5) ** 2 + ((v % 1) - 0.5) ** 2 < 0.09).astype(np.float64)
    return 0.5 + 0.5 * np.sin(2 * np.pi * u + 2.0 * np.sin(2 * np.pi * v))  # waves


# --- scene composition ----------------------------------------------------------------------------------


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _segment_frame(direction: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Box axes (columns) for a limb along ``direction``, its depth axis as close to ``forward`` as can be."""
    y = direction / np.linalg.norm(direction)
    z = forward - (forward @ y) * y
    z = z / np.linalg.norm(z) if np.linalg.norm(z) > 1e-6 else np.array([1.0, 0.0, 0.0])
    return np.stack([np.cross(y, z), y, z], axis=1)


def _figure(rng: np.random.Generator, position: np.ndarray, instance: int) -> list[_Surface]:
    """An articulated figure standing at ``position`` on the floor, facing roughly towards the camera."""
    s = rng.uniform(1.5, 1.8) / 1.7
    turn = _rot_y(rng.uniform(-0.6, 0.6))
    forward = turn @ np.array([0.0, 0.0, -1.0])
    skin, cloth = rng.uniform(0.45, 0.95, 3), rng.uniform(0.1, 0.9, (2, 3))
    texture, label = int(rng.integers(len(TEXTURES))), CLASS_INDEX["person"]

    def world(p: np.ndarray) -> np.ndarray:
        return position + turn @ (p * s)

    def part(name: str, kind: str, geometry: dict, colours: np.ndarray) -> _Surface:
        return _Surface(kind, geometry, label, FIGURE_PARTS.index(name) + 1, instance, texture, colours, 0.08)

    surfaces = [
        part("head", "sphere", {"centre": world(np.array([0.0, 1.58, 0.0])), "radius": 0.12 * s}, skin[None]),
        part(
            "torso",
            "box",
            {
                "centre": world(np.array([0.0, 1.13, 0.0])),
                "rot": turn,
                "half": np.array([0.19, 0.29, 0.1]) * s,
            },
            cloth,
        ),
    ]
    for side, sign in (("l", -1.0), ("r", 1.0)):
        limbs = [
            ("uarm", "larm", np.array([sign * 0.25, 1.38, 0.0]), 0.3, 0.1, rng.uniform(0.1, 1.4), 0.7),
            ("uleg", "lleg", np.array([sign * 0.1, 0.86, 0.0]), 0.43, 0.14, rng.uniform(0.0, 0.3), 0.5),
        ]
        for upper, lower, joint, length, width, abduct, swing in limbs:
            a, b = abduct, rng.uniform(-swing, swing)
            bend_a, bend_b = a + rng.uniform(0.0, 0.6) * (upper == "uarm"), b - rng.uniform(0.0, 0.8)
            colours = cloth if upper == "uleg" else np.stack([skin, cloth[0]])
            for name, (ang_a, ang_b) in ((side + upper, (a, b)), (side + lower, (bend_a, bend_b))):
                local = np.array(
                    [sign * np.sin(ang_a), -np.cos(ang_a) * np.cos(ang_b), np.cos(ang_a) * np.sin(ang_b)]
                )
                direction = turn @ local
                centre = world(joint) + direction * length * s / 2
                geometry = {
                    "centre": centre,
                    "rot": _segment_frame(direction, forward),
                    "half": np.array([width / 2, length / 2, width / 2]) * s,
                }
                surfaces.append(part(name, "box", geometry, colours))
                joint = joint + local * length
                width *= 0.9
    return surfaces


_OBJECT_KINDS = ("tvmonitor", "diningtable", "bottle", "pottedplant")


def _object(rng: np.random.Generator, name: str, instance: int) -> tuple[_Surface, float]:
    """An object of class ``name`` standing on the floor at the origin (``_move`` places it once its
    footprint fits); returns it and its footprint radius."""
    texture = int(rng.integers(len(TEXTURES)))
    colours = rng.uniform(0.05, 0.95, (2, 3))
    label, angle, scale = CLASS_INDEX[name], rng.uniform(0, np.pi), rng.uniform(0.1, 0.25)
    if name in ("tvmonitor", "diningtable"):
        if name == "tvmonitor":
            half = np.array([rng.uniform(0.25, 0.4), rng.uniform(0.18, 0.28), 0.05])
        else:
            half = np.array([rng.uniform(0.45, 0.7), rng.uniform(0.22, 0.35), rng.uniform(0.25, 0.4)])
        rot = _rot_y(rng.uniform(-0.6, 0.6))
        geometry: _Geometry = {"centre": np.array([0.0, half[1], 0.0]), "rot": rot, "half": half}
        surface = _Surface("box", geometry, label, 0, instance, texture, colours, scale, angle)
        return surface, float(np.hypot(half[0], half[2]))
    if name == "bottle":
        r = rng.uniform(0.08, 0.14)
        geometry = {"base": np.zeros(3), "radius": r, "height": rng.uniform(0.35, 0.6)}
        return _Surface("cylinder", geometry, label, 0, instance, texture, colours, scale, angle), r
    r = rng.uniform(0.2, 0.35)
    geometry = {"centre": np.array([0.0, r, 0.0]), "radius": r}
    return _Surface("sphere", geometry, label, 0, instance, texture, colours, scale, angle), r


def _room(rng: np.random.Generator) -> tuple[list[_Surface], tuple[float, float, float]]:
    """Floor, back wall and side walls; returns them and the walls' positions (back z, left x, right x)."""
    back, left, right = rng.uniform(6.0, 9.0), -rng.uniform(2.5, 4.0), rng.uniform(2.5, 4.0)
    floor, wall = CLASS_INDEX["floor"], CLASS_INDEX["wall"]
    e = np.eye(3)
    planes = [
        (floor, e[1], np.zeros(3), e[0], e[2]),
        (wall, -e[2], np.array([0.0, 0.0, back]), e[0], e[1]),
        (wall, e[0], np.array([left, 0.0, 0.0]), e[2], e[1]),
        (wall, -e[0], np.array([right, 0.0, 0.0]), e[2], e[1]),
    ]
    wall_texture, wall_colours = int(rng.choice([0, 2, 4])), rng.uniform(0.4, 0.95, (2, 3))
    surfaces = []
    for label, normal, point, u, v in planes:
        is_floor = label == floor
        texture = int(rng.choice([1, 2, 0])) if is_floor else wall_texture
        colours = rng.uniform(0.15, 0.7, (2, 3)) if is_floor else wall_colours
        geometry = {"normal": normal, "point": point, "u": u, "v": v}
        surfaces.append(_Surface("plane", geometry, label, 0, 0, texture, colours, rng.uniform(0.3, 0.8)))
    return surfaces, (back, left, right)


def render_scene(
    seed: int, index: int, size: tuple[int, int] = (64, 64), stream: int = 0, zoom: float = 1.0
) -> Scene:
    """Render scene ``index`` of ``(seed, stream)`` at ``size`` (H, W). ``zoom`` is the focal length in
    image widths (1: a 53° field of view; larger frames the objects closer, from the same random draws)."""
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"scene size must be (H, W) with both sides >= 8, got {size}")
    if not zoom > 0:
        raise ValueError(f"zoom must be > 0, got {zoom}")
    rng = np.random.default_rng([seed, stream, index])
    height, width = size
    focal = zoom * width
    cam_h, pitch = rng.uniform(1.3, 1.7), rng.uniform(0.15, 0.35)
    origin = np.array([0.0, cam_h, 0.0])
    # Camera axes in the world (columns): right, down, forward; the camera looks down by ``pitch``.
    cam = np.array(
        [[1.0, 0.0, 0.0], [0.0, -np.cos(pitch), -np.sin(pitch)], [0.0, -np.sin(pitch), np.cos(pitch)]]
    ).T
    surfaces, (back, left, right) = _room(rng)
    # Objects and the figure stand where the camera sees their foot: visible ground between the walls.
    half_fov = 0.5 * width / focal * 0.8
    placed: list[tuple[float, float, float]] = []
    instance = 1

    def place(radius: float, near: float, far: float) -> tuple[float, float] | None:
        for _ in range(20):
            z = rng.uniform(near, min(far, back - 0.8))
            x = rng.uniform(max(-half_fov * z, left + radius), min(half_fov * z, right - radius))
            if all(np.hypot(x - px, z - pz) > radius + pr + 0.1 for px, pz, pr in placed):
                placed.append((x, z, radius))
                return x, z
        return None

    if rng.random() < 0.75 and (spot := place(0.35, 2.5, 4.5)) is not None:
        surfaces += _figure(rng, np.array([spot[0], 0.0, spot[1]]), instance)
        instance += 1
    for _ in range(int(rng.integers(2, 6))):
        name = _OBJECT_KINDS[int(rng.integers(len(_OBJECT_KINDS)))]
        obj, radius = _object(rng, name, instance)
        if (spot := place(radius, 1.8, 6.0)) is None:
            continue
        _move(obj, spot[0], spot[1])
        surfaces.append(obj)
        instance += 1

    v, u = np.mgrid[:height, :width].astype(np.float64)
    rays_cam = np.stack([(u + 0.5 - width / 2) / focal, (v + 0.5 - height / 2) / focal, np.ones_like(u)], -1)
    rays = rays_cam.reshape(-1, 3) @ cam.T  # camera-z component 1: the ray parameter is the depth
    t, normal, uv, surface_id, hit = _cast(origin, rays, surfaces)

    n_pix = len(rays)
    albedo = np.zeros((n_pix, 3))
    fields = {k: np.zeros(n_pix, dtype=np.int64) for k in ("labels", "parts", "instance", "texture")}
    for i, s in enumerate(surfaces):
        mine = hit == i
        if not mine.any():
            continue
        w = _pattern(s.texture, uv[mine], s.scale, s.angle)[:, None]
        assert s.colours is not None  # every surface is built with its colours
        colours = s.colours if len(s.colours) == 2 else np.repeat(s.colours, 2, axis=0)
        albedo[mine] = (1 - w) * colours[0] + w * colours[1]
        for key, value in (
            ("labels", s.label),
            ("parts", s.part),
            ("instance", s.instance),
            ("texture", s.texture),
        ):
            fields[key][mine] = value

    light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(-0.8, -0.2)])
    light /= np.linalg.norm(light)
    points = origin + t[:, None] * rays
    objects = [s for s in surfaces if s.kind != "plane"]
    shadow_t = _cast(points + normal * 1e-3, np.broadcast_to(light, rays.shape).copy(), objects)[0]
    lit = np.clip(normal @ light, 0.0, None) * ~np.isfinite(shadow_t)
    photo = albedo * (0.35 + 0.65 * lit[:, None]) * 255 + rng.normal(0.0, 3.0, albedo.shape)

    normals_cam = normal @ cam  # world → camera axes (right, down, forward)
    normals_cam[:, 2] *= -1  # stored z points towards the camera
    shape = (height, width)
    return Scene(
        image=np.clip(np.rint(photo), 0, 255).astype(np.uint8).reshape(*shape, 3),
        albedo=albedo.astype(np.float32).reshape(*shape, 3),
        depth=t.astype(np.float32).reshape(shape),
        normals=normals_cam.astype(np.float32).reshape(*shape, 3),
        labels=fields["labels"].reshape(shape),
        parts=fields["parts"].astype(np.uint8).reshape(shape),
        instance=fields["instance"].astype(np.int32).reshape(shape),
        texture=fields["texture"].astype(np.uint8).reshape(shape),
        surface=surface_id.astype(np.int32).reshape(shape),
        focal=focal,
    )


def _move(surface: _Surface, x: float, z: float) -> None:
    key = "base" if surface.kind == "cylinder" else "centre"
    surface.geometry[key] = surface.geometry[key] + np.array([x, 0.0, z])


def _cast(
    origin: np.ndarray, rays: np.ndarray, surfaces: list[_Surface]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of every ray: t, world normal, texture coordinates, planar-face id, surface index."""
    n = len(rays)
    best_t = np.full(n, np.inf)
    normal, uv = np.zeros((n, 3)), np.zeros((n, 2))
    face, hit = np.full(n, -1), np.full(n, -1)
    for i, s in enumerate(surfaces):
        t, nrm, coords, f = _INTERSECT[s.kind](origin, rays, s.geometry)
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        normal[closer], uv[closer] = nrm[closer], coords[closer]
        face[closer] = np.where(f[closer] >= 0, i * _FACES + f[closer], -1)
        hit[closer] = i
    return best_t, normal, uv, face, hit
