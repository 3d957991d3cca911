"""Grid, deformation and implicit shapes for the synthetic phantom.

Two coordinate systems are used:

* *physical* ``p`` (LPS mm) of every voxel, from the grid's affine;
* *canonical* ``q`` (LPS-like mm of a standard patient): ``q = A⁻¹(p - t) + D(p)``
  where ``A``/``t`` is a random similarity-ish transform (per-axis scale,
  rotation about the patient axes, shift) and ``D`` a smooth random
  displacement field. Organs are defined in ``q``; lesions in ``p``.

Shapes are signed distances in mm (negative inside); partial-volume occupancy
is ``clip(0.5 - d / w, 0, 1)`` with ``w`` the mean voxel size. Every shape is
evaluated only in its bounding box, so cost scales with the shape, not the grid.
Random fields live on a physical lattice, so the same seed gives the same
anatomy at any grid size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Box = tuple[slice, slice, slice]

#: Physical box (mm) over which random lattice fields are defined.
FIELD_EXTENT_MM = 320.0


def rotation(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> F64:
    """Rotation matrix about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx, dtype=np.float64)


def _interp_matrix(coords: F64, lattice: F64) -> F64:
    """Linear interpolation weights (len(coords) x len(lattice)) on a regular lattice."""
    step = lattice[1] - lattice[0]
    pos = np.clip((coords - lattice[0]) / step, 0, len(lattice) - 1 - 1e-9)
    i0 = np.floor(pos).astype(int)
    frac = pos - i0
    w = np.zeros((len(coords), len(lattice)))
    rows = np.arange(len(coords))
    w[rows, i0] = 1 - frac
    w[rows, np.minimum(i0 + 1, len(lattice) - 1)] += frac
    return w


@dataclass
class Grid:
    """An axial LPS grid: ``array[k, r, c]``; k runs inferior→superior."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    origin: tuple[float, float, float]  # LPS of voxel (0, 0, 0)

    @classmethod
    def centred(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        centre: tuple[float, float, float],
    ) -> Grid:
        k, r, c = shape
        sk, sr, sc = spacing
        origin = (
            centre[0] - (c - 1) * sc / 2,
            centre[1] - (r - 1) * sr / 2,
            centre[2] - (k - 1) * sk / 2,
        )
        return cls(shape=shape, spacing=spacing, origin=origin)

    @property
    def affine(self) -> F64:
        sk, sr, sc = self.spacing
        a = np.zeros((4, 4))
        a[0, 2] = sc  # column -> +x (patient left)
        a[1, 1] = sr  # row -> +y (posterior)
        a[2, 0] = sk  # slice -> +z (superior)
        a[:3, 3] = self.origin
        a[3, 3] = 1.0
        return a

    @property
    def axes_mm(self) -> tuple[F64, F64, F64]:
        """Physical z (per k), y (per r), x (per c) coordinates."""
        k, r, c = self.shape
        sk, sr, sc = self.spacing
        x0, y0, z0 = self.origin
        return (
            np.asarray(z0 + sk * np.arange(k), dtype=np.float64),
            np.asarray(y0 + sr * np.arange(r), dtype=np.float64),
            np.asarray(x0 + sc * np.arange(c), dtype=np.float64),
        )

    @property
    def voxel_mm(self) -> float:
        return float(np.mean(self.spacing))

    def box_from_physical(self, lo: npt.ArrayLike, hi: npt.ArrayLike, margin: float) -> Box:
        """Index box covering the physical (x, y, z) range plus ``margin`` mm."""
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        z, y, x = self.axes_mm
        out = []
        for axis, a, b in ((z, lo[2], hi[2]), (y, lo[1], hi[1]), (x, lo[0], hi[0])):
            step = axis[1] - axis[0] if len(axis) > 1 else 1.0
            i0 = int(np.floor((a - margin - axis[0]) / step))
            i1 = int(np.ceil((b + margin - axis[0]) / step)) + 1
            out.append(slice(max(i0, 0), max(min(i1, len(axis)), 0)))
        return (out[0], out[1], out[2])

    def lattice_field(
        self,
        rng: np.random.Generator,
        node_mm: float,
        n: int = 1,
        *,
        centre: npt.ArrayLike = (0.0, 0.0, 0.0),
    ) -> list[F32]:
        """``n`` smooth random fields (unit std at nodes) on a lattice of ``node_mm``.

        The lattice spans ±``FIELD_EXTENT_MM`` around ``centre`` (LPS mm; the
        patient's anatomical origin), so fields move with the patient, not the table.
        """
        cx, cy, cz = (float(v) for v in np.asarray(centre, dtype=np.float64))
        count = int(np.ceil(2 * FIELD_EXTENT_MM / node_mm)) + 1
        lattice = np.asarray(-FIELD_EXTENT_MM + node_mm * np.arange(count), dtype=np.float64)
        z, y, x = self.axes_mm
        wz = _interp_matrix(z, lattice + cz)
        wy = _interp_matrix(y, lattice + cy)
        wx = _interp_matrix(x, lattice + cx)
        fields = []
        for _ in range(n):
            coarse = rng.standard_normal((count, count, count))
            f = np.tensordot(coarse, wx, axes=([2], [1]))  # (z, y, X)
            f = np.tensordot(f, wy, axes=([1], [1]))  # (z, X, Y)
            f = np.tensordot(f, wz, axes=([0], [1]))  # (X, Y, Z)
            fields.append(np.ascontiguousarray(f.transpose(2, 1, 0)).astype(np.float32))
        return fields


@dataclass
class Deformation:
    """``q = A⁻¹ (p - t) + D(p)`` on a grid, with ``D`` bounded by ``max_disp`` mm."""

    grid: Grid
    matrix: F64  # A (3x3)
    shift: F64  # t (3,)
    disp: tuple[F32, F32, F32]  # D_x, D_y, D_z on the grid
    max_disp: float

    def __post_init__(self) -> None:
        z, y, x = self.grid.axes_mm
        inv = np.linalg.inv(self.matrix)
        px = x[None, None, :] - self.shift[0]
        py = y[None, :, None] - self.shift[1]
        pz = z[:, None, None] - self.shift[2]
        q = []
        for i in range(3):
            qi = inv[i, 0] * px + inv[i, 1] * py + inv[i, 2] * pz
            q.append((qi + self.disp[i]).astype(np.float32))
        self.q: tuple[F32, F32, F32] = (q[0], q[1], q[2])

    def to_physical(self, q_pts: F64) -> F64:
        """Approximate physical position of canonical points (ignores ``D``)."""
        return np.asarray(np.atleast_2d(q_pts) @ self.matrix.T + self.shift, dtype=np.float64)

    def box(self, lo_q: npt.ArrayLike, hi_q: npt.ArrayLike) -> Box:
        """Index box of a canonical-space axis-aligned box (conservative)."""
        lo_q = np.asarray(lo_q, dtype=np.float64)
        hi_q = np.asarray(hi_q, dtype=np.float64)
        corners = np.array(
            [
                [a, b, c]
                for a in (lo_q[0], hi_q[0])
                for b in (lo_q[1], hi_q[1])
                for c in (lo_q[2], hi_q[2])
            ]
        )
        p = self.to_physical(corners)
        scale = float(np.abs(self.matrix).sum(axis=1).max())
        return self.grid.box_from_physical(p.min(0), p.max(0), self.max_disp * scale + 4.0)

    def coords(self, box: Box) -> tuple[F32, F32, F32]:
        return (self.q[0][box], self.q[1][box], self.q[2][box])

    def locate(self, q_point: Sequence[float]) -> tuple[int, int, int]:
        """The voxel whose canonical coordinate is nearest ``q_point``."""
        d = (
            (self.q[0] - q_point[0]) ** 2
            + (self.q[1] - q_point[1]) ** 2
            + (self.q[2] - q_point[2]) ** 2
        )
        k, r, c = np.unravel_index(int(np.argmin(d)), d.shape)
        return (int(k), int(r), int(c))


def ellipsoid_sdf(
    x: F32, y: F32, z: F32, centre: npt.ArrayLike, semi: npt.ArrayLike, rot: F64 | None = None
) -> F32:
    """Approximate signed distance (mm) to an ellipsoid (first-order, exact on the surface)."""
    centre = np.asarray(centre, dtype=np.float64)
    semi = np.asarray(semi, dtype=np.float64)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    if rot is not None:  # local = R^T (p - c)
        lx = rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz
        ly = rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz
        lz = rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz
    else:
        lx, ly, lz = dx, dy, dz
    ux, uy, uz = lx / semi[0], ly / semi[1], lz / semi[2]
    r = np.sqrt(ux * ux + uy * uy + uz * uz) + 1e-6
    g = np.sqrt((ux / semi[0]) ** 2 + (uy / semi[1]) ** 2 + (uz / semi[2]) ** 2) / r + 1e-6
    return np.asarray((r - 1.0) / g, dtype=np.float32)


def ellipsoid_bounds(
    centre: npt.ArrayLike, semi: npt.ArrayLike, rot: F64 | None = None
) -> tuple[F64, F64]:
    """Axis-aligned bounds of a (rotated) ellipsoid."""
    c = np.asarray(centre, dtype=np.float64)
    s = np.asarray(semi, dtype=np.float64)
    half = s if rot is None else np.sqrt(((rot * s[None, :]) ** 2).sum(axis=1))
    return c - half, c + half


def polyline_sdf(x: F32, y: F32, z: F32, points: F64, radii: F64) -> F32:
    """Signed distance to a tube of varying radius along a polyline."""
    out = np.full(x.shape, np.inf, dtype=np.float32)
    for i in range(len(points) - 1):
        a, b = points[i], points[i + 1]
        ab = b - a
        denom = float(ab @ ab) + 1e-9
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom
        t = np.clip(t, 0.0, 1.0)
        d = np.sqrt(
            (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        )
        d = d - (radii[i] + t * (radii[i + 1] - radii[i]))
        np.minimum(out, d, out=out)
    return out


def smooth_curve(control: npt.ArrayLike, n: int = 24) -> F64:
    """Catmull-Rom curve through control points, ``n`` samples."""
    p = np.asarray(control, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    seg = len(p) - 3
    ts = np.linspace(0, seg, n)
    out = []
    for t in ts:
        i = min(int(t), seg - 1)
        u = t - i
        p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
        out.append(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * u
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * u**3
            )
        )
    return np.asarray(out)


def occupancy(sdf: F32, voxel_mm: float) -> F32:
    """Partial-volume fraction from a signed distance."""
    return np.clip(0.5 - sdf / voxel_mm, 0.0, 1.0).astype(np.float32)
