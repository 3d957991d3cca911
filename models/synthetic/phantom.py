"""The normal (and diffusely diseased) abdomen of a synthetic case.

All organs are implicit shapes in canonical coordinates (see ``geometry``),
painted back to front with partial-volume blending onto one image, each writing
its label where it covers more than half a voxel. Diffuse diseases change the
anatomy here: cirrhosis (nodular contour, small right lobe, caudate and left
lateral hypertrophy, splenomegaly, ascites), steatosis (low liver attenuation),
pancreatitis (swollen, hypoenhancing pancreas with peripancreatic stranding),
and pancreatic ductal adenocarcinoma's upstream effects (main duct dilatation,
parenchymal atrophy, common bile duct dilatation for head tumours).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.synthetic import labels as L
from models.synthetic.appearance import (
    STEATOSIS_HU_PER_PERCENT,
    background_value,
    tissue_value,
)
from models.synthetic.geometry import (
    F32,
    F64,
    Box,
    Deformation,
    Grid,
    ellipsoid_bounds,
    ellipsoid_sdf,
    occupancy,
    polyline_sdf,
    rotation,
    smooth_curve,
)
from models.vocab import ContrastPhase


@dataclass
class DiffuseState:
    """Diffuse disease parameters chosen by the generator before painting."""

    cirrhosis: bool = False
    steatosis_fat_percent: float = 0.0
    pancreatitis: bool = False
    pdac_t: float | None = None  # position of a PDAC along the pancreas (0 head .. 1 tail)
    ascites: bool = False


@dataclass
class Canvas:
    """Image and label map being painted, with the case's deformation and appearance."""

    grid: Grid
    deform: Deformation
    modality: str
    phase: ContrastPhase
    texture: F32
    image: F32 = field(init=False)
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.image = np.full(self.grid.shape, background_value(self.modality), dtype=np.float32)
        self.labels = np.zeros(self.grid.shape, dtype=np.uint8)

    def value(self, tissue: str) -> float:
        return tissue_value(self.modality, self.phase, tissue)

    def paint(
        self,
        box: Box,
        sdf: F32,
        tissue: str,
        label: int | None = None,
        *,
        texture: float = 0.0,
        offset: float = 0.0,
        scale: float = 1.0,
    ) -> np.ndarray:
        """Blend ``tissue`` where ``sdf`` < 0; write ``label`` where covered > 50 %."""
        occ = occupancy(sdf, self.grid.voxel_mm)
        value: F32 | float = self.value(tissue) * scale + offset
        if texture:
            value = value + texture * self.texture[box]
        img = self.image[box]
        img += occ * (value - img)
        covered = occ > 0.5
        if label is not None:
            self.labels[box][covered] = label
        return covered


@dataclass
class AnatomyInfo:
    """What lesion placement needs to know about the painted anatomy."""

    pancreas_curve: F64  # canonical centreline, head -> tail
    pancreas_radii: F64
    gallbladder_centre_q: tuple[float, float, float]
    portal_level_q: float
    qualities: dict[str, float] = field(default_factory=dict)


def _jit(rng: np.random.Generator, scale: float, n: int = 3) -> F64:
    return np.asarray(rng.uniform(-scale, scale, n), dtype=np.float64)


def _cavity(x: F32, y: F32, body: tuple[float, float], inset: float) -> F32:
    """Signed distance to the body ellipse shrunk by ``inset`` mm (2-D, all z)."""
    ax, ay = body[0] - inset, body[1] - inset
    z0 = np.zeros_like(x)
    return ellipsoid_sdf(x, y, z0, (0.0, 5.0, 0.0), (ax, ay, 1e6))


def _dome(x: F32, y: F32, dome_r: float, dome_l: float) -> F32:
    """Height (z mm) of the diaphragm at (x, y): two paraboloid domes."""
    right = dome_r - ((x + 70.0) ** 2 + (y - 10.0) ** 2) / 260.0
    left = dome_l - ((x - 70.0) ** 2 + (y - 10.0) ** 2) / 260.0
    return np.maximum(right, left).astype(np.float32)


def _ellipsoid(
    canvas: Canvas,
    centre: F64,
    semi: F64,
    rot: F64 | None = None,
    pad: float = 0.0,
) -> tuple[Box, F32, F32, F32, F32]:
    lo, hi = ellipsoid_bounds(centre, semi + pad, rot)
    box = canvas.deform.box(lo, hi)
    x, y, z = canvas.deform.coords(box)
    return box, x, y, z, ellipsoid_sdf(x, y, z, centre, semi, rot)


def _tube(
    canvas: Canvas, points: F64, radii: F64, pad: float = 0.0
) -> tuple[Box, F32, F32, F32, F32]:
    r = float(np.max(radii)) + pad
    box = canvas.deform.box(points.min(0) - r, points.max(0) + r)
    x, y, z = canvas.deform.coords(box)
    out = np.full(x.shape, np.inf, dtype=np.float32)
    # each segment only within its own bounding box (long curved tubes are cheap)
    for i in range(len(points) - 1):
        seg = points[i : i + 2]
        sub = canvas.deform.box(seg.min(0) - r, seg.max(0) + r)
        rel = tuple(
            slice(max(s.start, b.start) - b.start, max(min(s.stop, b.stop) - b.start, 0))
            for s, b in zip(sub, box, strict=True)
        )
        if any(sl.stop <= sl.start for sl in rel):
            continue
        d = polyline_sdf(x[rel], y[rel], z[rel], seg, radii[i : i + 2])
        np.minimum(out[rel], d, out=out[rel])
    return box, x, y, z, out


def build_anatomy(
    canvas: Canvas,
    rng: np.random.Generator,
    state: DiffuseState,
    *,
    sex: str,
    nodular: F32,
) -> AnatomyInfo:
    """Paint the abdomen onto ``canvas``; ``nodular`` is a unit-std fine random field."""
    grid = canvas.grid
    full: Box = (slice(0, grid.shape[0]), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
    xq, yq, zq = canvas.deform.coords(full)
    size = 1.0 if sex == "M" else 0.93
    # the peritoneal cavity fits the organs; fat and muscle wrap around it
    inner = (
        float(124 * size * rng.uniform(0.95, 1.08)),
        float(90 * size * rng.uniform(0.94, 1.08)),
    )
    fat_sc = float(rng.uniform(8, 35))
    wall = float(rng.uniform(8, 14))
    body = (inner[0] + fat_sc + wall, inner[1] + fat_sc + wall)
    dome_r = float(rng.uniform(95, 110))
    dome_l = dome_r - float(rng.uniform(5, 15))
    dome = _dome(xq, yq, dome_r, dome_l)

    # body wall: subcutaneous fat, muscle, visceral fat
    canvas.paint(full, _cavity(xq, yq, body, 0.0), "fat")
    canvas.paint(full, _cavity(xq, yq, body, fat_sc), "muscle", texture=3.0)
    cavity = _cavity(xq, yq, body, fat_sc + wall)
    canvas.paint(full, cavity, "fat")
    # ribs: 10 mm bony bands every 28 mm inside the muscle wall, sloping down
    # anteriorly, absent in front of the midline (costal cartilage) and below the 11th
    slope_z = zq - 0.35 * yq
    rib_phase = (dome_r * 7.0) % 28.0
    band = np.abs(np.mod(slope_z - rib_phase, 28.0) - 14.0) - 9.0
    shell = np.abs(cavity - 0.5 * wall) - 3.0
    ribs = np.maximum.reduce(
        [-band, shell, -60.0 - slope_z, np.minimum(45.0 - np.abs(xq), -20.0 - yq)]
    )
    canvas.paint(full, ribs, "bone")

    # pancreas centreline (needed for the stranding halo before anything else)
    pc = np.array(
        [[-30, 0, -62], [-22, -4, -46], [-4, -8, -36], [30, 6, -28], [64, 26, -18], [90, 42, -8]],
        dtype=np.float64,
    )
    pc = pc + _jit(rng, 6.0)[None, :]
    pc[:, 2] += np.linspace(0, 1, len(pc)) * rng.uniform(-8, 8)
    curve = smooth_curve(pc, 24)
    t = np.linspace(0.0, 1.0, len(curve))
    radii = np.interp(t, [0.0, 0.2, 0.35, 0.7, 1.0], [14, 13, 9.5, 10.5, 8.0]) * rng.uniform(
        0.85, 1.15
    )
    if state.pancreatitis:
        radii = radii * 1.3
    if state.pdac_t is not None:
        radii = np.where(t > state.pdac_t + 0.1, radii * 0.7, radii)
    if state.pancreatitis:
        box, x, y, z, sdf = _tube(canvas, curve, radii + 14.0)
        canvas.paint(box, np.maximum(sdf, cavity[box]), "stranding", texture=8.0)

    # lungs and heart above the diaphragm
    thorax = np.maximum(cavity + 2.0, dome + 6.0 - zq)
    canvas.paint(full, thorax, "lung", texture=10.0)
    hc = np.array([15.0, -25.0, 150.0]) + _jit(rng, 8.0)
    box, x, y, z, sdf = _ellipsoid(canvas, hc, np.array([62.0, 50.0, 55.0]))
    canvas.paint(box, np.maximum(sdf, dome[box] + 6.0 - z), "myocardium")

    # paraspinal muscles, psoas, spine, aorta
    for side in (-1.0, 1.0):
        box, x, y, z, sdf = _ellipsoid(
            canvas, np.array([side * 38.0, 96.0, -40.0]), np.array([26.0, 20.0, 400.0])
        )
        canvas.paint(box, np.maximum(sdf, _cavity(x, y, body, fat_sc)), "muscle", texture=3.0)
        pts = np.array([[side * 24, 48, -35], [side * 34, 40, -110], [side * 48, 28, -200]], float)
        box, x, y, z, sdf = _tube(canvas, pts, np.array([5.0, 14.0, 22.0]))
        canvas.paint(box, sdf, "muscle", texture=3.0)
    vb = np.array([0.0, 55.0, -40.0])
    box, x, y, z, sdf = _ellipsoid(canvas, vb, np.array([22.0, 19.0, 400.0]))
    canvas.paint(box, sdf, "bone")
    box, x, y, z, sdf = _ellipsoid(canvas, vb, np.array([18.5, 15.5, 400.0]))
    canvas.paint(box, sdf, "marrow", texture=15.0)
    disc_phase = float(rng.uniform(0, 32))
    disc = np.abs(np.mod(z - disc_phase, 32.0) - 16.0) - 12.0  # 8 mm discs every 32 mm
    canvas.paint(box, np.maximum(sdf - 3.0, -disc), "disc")
    for centre, semi, tissue in (
        ((0.0, 84.0, -40.0), (24.0, 8.0, 400.0), "bone"),
        ((0.0, 100.0, -40.0), (8.0, 15.0, 400.0), "bone"),
        ((0.0, 80.0, -40.0), (8.5, 8.0, 400.0), "csf"),
    ):
        box, x, y, z, sdf = _ellipsoid(canvas, np.array(centre), np.array(semi))
        canvas.paint(box, sdf, tissue)
    aorta = np.array([[12, 28, -200], [12, 26, 40], [14, 20, 200]], dtype=np.float64)
    aorta[:, :2] += _jit(rng, 4.0, 2)[None, :]
    box, x, y, z, sdf = _tube(canvas, aorta, np.full(3, rng.uniform(9.5, 13.0)))
    canvas.paint(box, sdf, "artery")

    # bowel: colon frame, small-bowel loops, duodenum, stomach
    colon = np.array(
        [
            [-92, 0, -190],
            [-95, -10, -80],
            [-70, -50, -62],
            [0, -68, -72],
            [70, -45, -50],
            [95, 15, -45],
            [95, 20, -190],
        ],
        dtype=np.float64,
    )
    colon = smooth_curve(colon + _jit(rng, 8.0)[None, :], 30)
    _bowel(canvas, rng, colon, np.full(len(colon), rng.uniform(18, 25)), air=0.4, stool=True)
    for _ in range(int(rng.integers(5, 10))):
        start = np.array([rng.uniform(-70, 70), rng.uniform(-80, 10), rng.uniform(-200, -95)])
        steps = rng.normal(0, 18, (5, 3))
        loop = smooth_curve(np.cumsum(np.vstack([start, steps]), axis=0), 16)
        _bowel(canvas, rng, loop, np.full(len(loop), rng.uniform(9, 14)), air=0.1, stool=False)
    duo = np.array(
        [[-20, -8, -28], [-48, -2, -36], [-54, 6, -66], [-30, 10, -90], [5, 12, -88]], float
    )
    duo = smooth_curve(duo + _jit(rng, 4.0)[None, :], 16)
    _bowel(canvas, rng, duo, np.full(len(duo), rng.uniform(9, 12)), air=0.2, stool=False)
    sc = np.array([58.0, -30.0, 25.0]) + _jit(rng, 10.0)
    ssemi = np.array([42.0, 34.0, 55.0]) * rng.uniform(0.8, 1.2, 3)
    srot = rotation(0.0, 0.0, rng.uniform(-30, 10))
    box, x, y, z, sdf = _ellipsoid(canvas, sc, ssemi, srot)
    inside = np.maximum(cavity[box] + 2.0, z - dome[box])
    canvas.paint(box, np.maximum(sdf, inside), "bowel_wall")
    lumen = np.maximum(sdf + 4.0, inside)
    canvas.paint(box, lumen, "bowel_content", texture=4.0)
    air_level = sc[1] - ssemi[1] * rng.uniform(0.1, 0.6)
    canvas.paint(box, np.maximum(lumen, y - air_level), "air")

    # kidneys (cortex, medulla, sinus)
    for label, side, zc in ((L.KIDNEY_LEFT, 1.0, -45.0), (L.KIDNEY_RIGHT, -1.0, -56.0)):
        kc = np.array([side * 74.0, 58.0, zc]) + _jit(rng, 7.0)
        ksemi = np.array([27.0, 23.0, 52.0]) * rng.uniform(0.88, 1.12, 3)
        rot = rotation(0.0, side * -12.0 + rng.uniform(-5, 5), side * 25.0 + rng.uniform(-8, 8))
        box, x, y, z, sdf = _ellipsoid(canvas, kc, ksemi, rot)
        canvas.paint(box, sdf, "kidney_cortex", label)
        canvas.paint(box, ellipsoid_sdf(x, y, z, kc, ksemi * 0.72, rot), "kidney_medulla", label)
        sinus_c = kc + np.array([-side * 10.0, -4.0, 0.0])
        canvas.paint(
            box,
            ellipsoid_sdf(x, y, z, sinus_c, ksemi * np.array([0.4, 0.4, 0.55]), rot),
            "renal_sinus",
        )

    # liver: right lobe, left lobe, caudate; cirrhosis reshapes it
    lj = _jit(rng, 8.0)
    rl_c = np.array([-72.0, 2.0, 28.0]) + lj
    rl_s = np.array([63.0, 78.0, 75.0]) * rng.uniform(0.9, 1.1, 3)
    ll_c = np.array([8.0, -38.0, 48.0]) + lj + _jit(rng, 8.0)
    ll_s = np.array([62.0, 38.0, 42.0]) * rng.uniform(0.85, 1.15, 3)
    cd_c = np.array([-14.0, 26.0, 32.0]) + lj
    cd_s = np.array([18.0, 15.0, 30.0])
    if state.cirrhosis:
        rl_s = rl_s * np.array([0.78, 0.85, 0.85])
        rl_c = rl_c + np.array([-10.0, 6.0, 0.0])
        cd_s = cd_s * 1.55
        ll_s = ll_s * 1.12
    ll_rot = rotation(0.0, 0.0, float(rng.uniform(-22, -8)))
    lo = np.minimum.reduce([rl_c - rl_s, ll_c - ll_s - 10, cd_c - cd_s]) - 20.0
    hi = np.maximum.reduce([rl_c + rl_s, ll_c + ll_s + 10, cd_c + cd_s]) + 20.0
    box = canvas.deform.box(lo, hi)
    x, y, z = canvas.deform.coords(box)
    liver = np.minimum.reduce(
        [
            ellipsoid_sdf(x, y, z, rl_c, rl_s),
            ellipsoid_sdf(x, y, z, ll_c, ll_s, ll_rot),
            ellipsoid_sdf(x, y, z, cd_c, cd_s),
        ]
    )
    bound = np.maximum(cavity[box] + 3.0, z - dome[box])
    if state.cirrhosis:
        liver = liver + 3.2 * nodular[box]
    liver = np.maximum(liver, bound)
    if state.ascites:
        canvas.paint(box, np.maximum(liver - rng.uniform(6, 14), bound), "fluid", L.BACKGROUND)
    spc = np.array([82.0, 45.0, 30.0]) + _jit(rng, 6.0)
    sp_s = np.array([24.0, 42.0, 55.0]) * rng.uniform(0.85, 1.15, 3)
    if state.cirrhosis:
        sp_s = sp_s * rng.uniform(1.2, 1.45)
    sp_rot = rotation(rng.uniform(-10, 10), 0.0, float(rng.uniform(20, 45)))
    sbox, _sx, _sy, sz, ssdf = _ellipsoid(canvas, spc, sp_s, sp_rot)
    sbound = np.maximum(cavity[sbox] + 3.0, sz - dome[sbox])
    canvas.paint(sbox, np.maximum(ssdf, sbound), "spleen", L.SPLEEN, texture=4.0)
    liver_offset = 0.0
    if state.steatosis_fat_percent > 0:
        drop = STEATOSIS_HU_PER_PERCENT * state.steatosis_fat_percent
        liver_offset = -drop if canvas.modality == "CT" else -drop * 3.0
    canvas.paint(
        box,
        liver,
        "liver",
        L.LIVER,
        texture=10.0 if state.cirrhosis else 4.0,
        offset=liver_offset,
    )

    # hepatic veins into the IVC, IVC
    top = np.array([-14.0, 22.0, 86.0]) + lj * [1, 1, 0.5]
    for end in ([-105, -5, 60], [-48, -62, 40], [12, -50, 62]):
        pts = np.array([top, (top + np.array(end) + lj) / 2.0, np.array(end) + lj])
        b2, _x, _y, _z, sdf2 = _tube(canvas, pts, np.array([6.0, 4.0, 2.0]))
        canvas.paint(b2, np.maximum(sdf2, liver_bound_sdf(canvas, b2, box, liver)), "vein_systemic")
    ivc = np.array([[-24, 30, -200], [-24, 28, 0], [-18, 24, 60], [-10, 20, 140]], float)
    ivc[:, :2] += _jit(rng, 4.0, 2)[None, :]
    b2, _x, _y, _z, sdf2 = _tube(canvas, ivc, np.full(4, rng.uniform(10, 13)))
    canvas.paint(b2, sdf2, "vein_systemic", L.BACKGROUND)

    # pancreas with its duct
    pbox, px, py, pz, psdf = _tube(canvas, curve, radii)
    canvas.paint(
        pbox, psdf, "pancreas", L.PANCREAS, texture=6.0, scale=0.8 if state.pancreatitis else 1.0
    )
    duct_r = np.full(len(curve), 1.2)
    duct_mm = 2.4
    if state.pdac_t is not None and state.pdac_t < 0.8:
        dil = float(rng.uniform(2.5, 4.0))
        duct_r = np.where(t > state.pdac_t, dil, duct_r)
        duct_mm = 2 * dil
    canvas.paint(pbox, polyline_sdf(px, py, pz, curve, duct_r), "fluid")

    # portal venous system
    conf = curve[8] + np.array([6.0, 14.0, 0.0])
    hilum = np.array([-30.0, 6.0, 8.0]) + lj
    portal = smooth_curve([conf, (conf + hilum) / 2 + np.array([-4, -2, 0]), hilum], 8)
    right_pv = smooth_curve(
        [hilum, hilum + np.array([-30, 5, 4]), hilum + np.array([-62, 10, 4])], 8
    )
    left_pv = smooth_curve(
        [hilum, hilum + np.array([24, -12, 8]), hilum + np.array([48, -32, 12])], 8
    )
    splenic = smooth_curve(
        [
            conf,
            curve[14] + np.array([0, 12, 0]),
            curve[19] + np.array([0, 12, 0]),
            curve[-1] + np.array([6, 10, 4]),
        ],
        14,
    )
    smv = np.array([conf, conf + np.array([2, -10, -40]), conf + np.array([4, -20, -110])])
    pv_r = float(rng.uniform(5.5, 7.0)) * (1.15 if state.cirrhosis else 1.0)
    for pts, r0, r1, lab in (
        (smv, 5.0, 5.0, L.BACKGROUND),
        (portal, pv_r, pv_r, L.PORTAL_SPLENIC_VEIN),
        (right_pv, 4.5, 3.0, L.PORTAL_SPLENIC_VEIN),
        (left_pv, 4.0, 2.5, L.PORTAL_SPLENIC_VEIN),
        (splenic, 4.5, 4.0, L.PORTAL_SPLENIC_VEIN),
    ):
        rr = np.linspace(r0, r1, len(pts))
        b2, _x, _y, _z, sdf2 = _tube(canvas, np.asarray(pts, dtype=np.float64), rr)
        canvas.paint(b2, sdf2, "portal", lab)

    # common bile duct through the pancreatic head to the duodenum
    cbd = smooth_curve(
        [
            hilum + np.array([0, 4, -4]),
            curve[3] + np.array([-6, 10, 14]),
            curve[1] + np.array([-6, 8, 0]),
            duo[5],
        ],
        12,
    )
    cbd_r = 2.5
    if state.pdac_t is not None and state.pdac_t < 0.3:
        cbd_r = float(rng.uniform(5.0, 7.0))
    cbd_r_arr = np.full(len(cbd), cbd_r)
    cbd_r_arr[-3:] = 1.5
    b2, _x, _y, _z, sdf2 = _tube(canvas, cbd, cbd_r_arr)
    canvas.paint(b2, sdf2, "bile", L.BILE_DUCT)
    intrahepatic = cbd_r > 4.0
    if intrahepatic:  # obstruction: dilated ducts beside the portal branches, inside the liver
        for branch in (right_pv, left_pv):
            ducts = branch + np.array([0.0, -7.0, 3.0])
            b3, _x, _y, _z, sdf3 = _tube(canvas, ducts, np.linspace(3.0, 1.5, len(ducts)))
            inside = liver_bound_sdf(canvas, b3, box, liver)
            canvas.paint(b3, np.maximum(sdf3, inside + 1.0), "bile", L.BILE_DUCT)

    # gallbladder in its fossa: wall then bile
    gc = np.array([-42.0, -42.0, -22.0]) + lj + _jit(rng, 5.0)
    g_s = np.array([15.0, 15.0, 36.0]) * rng.uniform(0.8, 1.2, 3)
    g_rot = rotation(float(rng.uniform(20, 45)), float(rng.uniform(-15, 15)), 0.0)
    b2, _x, _y, _z, sdf2 = _ellipsoid(canvas, gc, g_s, g_rot)
    gbound = cavity[b2] + 3.0
    canvas.paint(b2, np.maximum(sdf2, gbound), "gallbladder_wall", L.GALLBLADDER)
    canvas.paint(b2, np.maximum(sdf2 + 2.5, gbound), "bile", L.GALLBLADDER)

    return AnatomyInfo(
        pancreas_curve=curve,
        pancreas_radii=radii,
        gallbladder_centre_q=(float(gc[0]), float(gc[1]), float(gc[2])),
        portal_level_q=float(hilum[2]),
        qualities={
            "pancreatic_duct_mm": duct_mm,
            "cbd_mm": 2 * cbd_r,
            "intrahepatic_duct_dilatation": 1.0 if intrahepatic else 0.0,
        },
    )


def liver_bound_sdf(canvas: Canvas, inner: Box, outer: Box, liver: F32) -> F32:
    """The liver's signed distance cropped from ``outer`` to ``inner`` (+inf outside ``outer``)."""
    out = np.full(canvas.image[inner].shape, np.inf, dtype=np.float32)
    lo = [max(i.start, o.start) for i, o in zip(inner, outer, strict=True)]
    hi = [min(i.stop, o.stop) for i, o in zip(inner, outer, strict=True)]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return out
    dst = tuple(slice(a - i.start, b - i.start) for a, b, i in zip(lo, hi, inner, strict=True))
    src = tuple(slice(a - o.start, b - o.start) for a, b, o in zip(lo, hi, outer, strict=True))
    out[dst] = liver[src]
    return out


def _bowel(
    canvas: Canvas,
    rng: np.random.Generator,
    curve: F64,
    radii: F64,
    *,
    air: float,
    stool: bool,
) -> None:
    box, _x, y, _z, sdf = _tube(canvas, curve, radii)
    canvas.paint(box, sdf, "bowel_wall")
    lumen = sdf + 3.0
    canvas.paint(box, lumen, "stool" if stool else "bowel_content", texture=20.0 if stool else 4.0)
    if rng.random() < 0.8:
        # air collects anteriorly (supine); in the colon also as mottled pockets
        level = float(np.min(curve[:, 1]) + np.max(radii) * rng.uniform(-0.5, 0.9))
        pocket = np.maximum(lumen, y - level)
        if stool:
            pocket = np.minimum(pocket, np.maximum(lumen, canvas.texture[box] * -8.0 + 6.0))
        if air > 0.05:
            canvas.paint(box, pocket, "air")
