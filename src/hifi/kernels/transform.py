"""Similarity transform between two subject masks: Eq. (8), Eq. (9) and Algorithm 4.

HiFi Tuner places the reference subject where the subject appears in a generated image
by a similarity transform ``T_theta`` fitted between the reference mask ``M_r`` and the
generated mask ``M_g``.

Eq. (8):  ``T_theta = S(theta_1) . R(theta_2) . Tr(theta_3, theta_4)``, a uniform scale,
a rotation and a translation, as one 3x3 homogeneous matrix (:func:`similarity_matrix`).

Eq. (9):  ``theta* = argmin_theta D_c(P(T_theta(M_r)), P(M_g))``, where ``P(M)`` is the set
of coordinates of the pixels of ``M`` equal to 1 and ``D_c`` is the Chamfer distance
(:func:`fit_similarity_transform`, which follows Algorithm 4 with the changes below and
in its docstring).

Coordinates: the pixel at row ``i`` and column ``j`` of an image has coordinates
``(x, y) = (j, i)`` and is used as the homogeneous vector ``(x, y, 1)``; pixel centres sit
at integer coordinates. Because ``y`` points down, a positive angle turns ``+x`` towards
``+y``, which is clockwise on screen.

Why the fit does not minimise Algorithm 4's objective as written. Algorithm 4 minimises
``sum_{p in P(M_r)} min_{q in P(M_g)} ||T_theta(p) - q||^2``: every term starts from a
transformed reference point, and nothing asks that the generated points be covered. A
transform that shrinks the whole reference into a small part of the generated mask scores
as well as the true alignment or better, and in the limit (scale -> 0 onto a single
generated point) the sum is exactly 0, so gradient descent drifts towards that collapse.
The symmetric Chamfer distance adds the mean, over generated points, of the squared
distance to the nearest transformed reference point; that term grows as the reference
shrinks, so the minimum is the alignment. The symmetric objective is not convex either
(the principal axis of a shape is defined only up to 180 degrees, for one), so the fit
starts from the masks' moments, refines several starts by gradient descent and keeps the
best. ``symmetric=False`` keeps the literal one-sided objective for comparison.

Pixels are points at their centres, as ``P(M)`` is in the paper, so a shape's extent runs
between its outermost pixel centres, half a pixel inside its edge on each side. Scaling
does not preserve that half pixel, so the fitted scale is off by roughly
``(scale - 1) / extent_in_pixels``: a few percent for shapes 30 px across, negligible at
full image resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ChamferProblem",
    "SimilarityFit",
    "chamfer_distance",
    "chamfer_distances",
    "chamfer_objective",
    "fit_similarity_transform",
    "similarity_matrix",
    "warp_image",
    "warp_mask",
]


def similarity_matrix(scale: Tensor | float, angle: Tensor | float, tx: Tensor | float, ty: Tensor | float) -> Tensor:
    """``T_theta = S(scale) @ R(angle) @ Tr(tx, ty)``, Eq. (8), as a 3x3 homogeneous matrix.

    Acting on ``(x, y, 1)`` it translates by ``(tx, ty)`` first, then rotates by ``angle``
    (radians) about the origin, then scales by ``scale`` about the origin:
    ``T(p) = scale * R(angle) @ (p + (tx, ty))``. Differentiable in all four parameters,
    which may be tensors of any broadcastable shape ``[...]`` (giving ``[..., 3, 3]``);
    the result takes the dtype and device of the first tensor argument (floating), or the
    default dtype when all are numbers.
    """
    first = next((v for v in (scale, angle, tx, ty) if isinstance(v, Tensor)), None)
    dtype = torch.get_default_dtype()
    if first is not None and first.is_floating_point():
        dtype = first.dtype
    device = None if first is None else first.device
    s, a, x, y = torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=dtype, device=device) for v in (scale, angle, tx, ty))
    )
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    cos, sin = torch.cos(a), torch.sin(a)

    def matrix(rows: Sequence[Sequence[Tensor]]) -> Tensor:
        return torch.stack([torch.stack(list(row), dim=-1) for row in rows], dim=-2)

    scaling = matrix([[s, zero, zero], [zero, s, zero], [zero, zero, one]])
    rotation = matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])
    translation = matrix([[one, zero, x], [zero, one, y], [zero, zero, one]])
    return scaling @ rotation @ translation


def chamfer_distance(p: Tensor, q: Tensor, *, symmetric: bool = True, squared: bool = True) -> Tensor:
    """Chamfer distance between point sets ``p [..., N, D]`` and ``q [..., M, D]``.

    One-sided: ``mean_i min_j d(p_i, q_j)``. Symmetric (the default): that plus
    ``mean_j min_i d(q_j, p_i)``. ``d`` is the squared Euclidean distance (as in
    Algorithm 4), or the Euclidean distance when ``squared=False``. Means rather than
    Algorithm 4's sum, so that the value does not depend on how many points were sampled.
    Returns a tensor of shape ``[...]`` (a scalar for unbatched inputs); differentiable.
    """
    if p.shape[-2] == 0 or q.shape[-2] == 0:
        raise ValueError("chamfer_distance needs at least one point in each set")
    # The direct distance stays exact near 0, where cdist's faster matrix-product expansion
    # |a|^2 + |b|^2 - 2 a.b cancels catastrophically.
    dist = torch.cdist(p, q, compute_mode="donot_use_mm_for_euclid_dist")
    if squared:
        dist = dist.square()
    out = dist.min(dim=-1).values.mean(dim=-1)
    if symmetric:
        out = out + dist.min(dim=-2).values.mean(dim=-1)
    return out


def _pixel_to_normalised(size: tuple[int, int], like: Tensor) -> Tensor:
    """Pixel coordinates -> grid_sample's [-1, 1] coordinates (align_corners=False)."""
    h, w = size
    return like.new_tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def warp_image(
    image: Tensor,
    matrix: Tensor,
    out_size: tuple[int, int],
    *,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> Tensor:
    """Resample ``image [..., C, H, W]`` so that the content at pixel ``p`` moves to ``matrix @ p``.

    ``output(p) = image(matrix^-1 @ p)`` for every output pixel ``p`` of an
    ``out_size = (H_out, W_out)`` canvas, with zeros where ``matrix^-1 @ p`` falls outside
    the input. ``matrix`` is a 3x3 homogeneous matrix in pixel coordinates (see the module
    docstring), e.g. :attr:`SimilarityFit.matrix`. The image must be floating point.
    """
    if image.ndim < 3:
        raise ValueError(f"warp_image expects [..., C, H, W], got shape {tuple(image.shape)}")
    *lead, c, h, w = image.shape
    work = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    # affine_grid maps normalised output coordinates to normalised input coordinates, so
    # the pixel-space inverse map is conjugated by the two pixel->normalised conversions.
    theta = (
        _pixel_to_normalised((h, w), work)
        @ torch.linalg.inv(work)
        @ torch.linalg.inv(_pixel_to_normalised(out_size, work))
    )
    flat = image.reshape(-1, c, h, w)
    n = flat.shape[0]
    grid = F.affine_grid(
        theta[:2].to(image.dtype).expand(n, 2, 3),
        [n, c, out_size[0], out_size[1]],
        align_corners=False,
    )
    out = F.grid_sample(flat, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.reshape(*lead, c, out_size[0], out_size[1])


def warp_mask(mask: Tensor, matrix: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Warp a mask ``[..., H, W]`` like :func:`warp_image`; values in {0, 1}, same dtype as ``mask``.

    Foreground is ``mask > 0.5`` (any nonzero value for bool masks). The mask is resampled
    bilinearly and thresholded at 0.5, which keeps rotated edges straighter than
    nearest-neighbour sampling does.
    """
    soft = warp_image(_foreground(mask).unsqueeze(-3).float(), matrix, out_size)
    return (soft.squeeze(-3) >= 0.5).to(mask.dtype)


@attrs.frozen
class SimilarityFit:
    """Result of :func:`fit_similarity_transform`.

    Attributes:
        scale, angle, tx, ty: the parameters of Eq. (8), ``T = S(scale) R(angle) Tr(tx, ty)``;
            ``angle`` in radians in (-pi, pi], ``tx`` and ``ty`` in reference-image pixels
            (they are applied before the scaling).
        matrix: ``similarity_matrix(scale, angle, tx, ty)``, float32 on the masks' device;
            maps reference pixel coordinates ``(x=col, y=row, 1)`` to generated-image pixel
            coordinates. Left out of ``==``, which it would make ambiguous.
        residual: the symmetric Chamfer distance at the fit as a mean nearest-neighbour
            distance in generated-image pixels: the average of (mean over transformed
            reference pixels of the Euclidean distance to the nearest generated pixel) and
            (mean over generated pixels of the distance to the nearest transformed reference
            pixel). Each mean runs over at most ``max_points`` sampled pixels; the distances
            are to the full other set, read from its distance field, bilinearly between
            pixel centres. 0 for a perfect fit.
    """

    scale: float
    angle: float
    tx: float
    ty: float
    matrix: Tensor = attrs.field(eq=False)
    residual: float


def _foreground(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask > 0.5


def _foreground_2d(mask: Tensor, name: str) -> Tensor:
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [H, W] mask, got shape {tuple(mask.shape)}")
    foreground = _foreground(mask)
    if not bool(foreground.any()):
        raise ValueError(f"{name} is empty: no pixel is set, so there is nothing to align")
    return foreground


def _points(foreground: Tensor) -> Tensor:
    """``P(M)``: (x, y) coordinates of the foreground pixels, float32 ``[N, 2]``."""
    rows, cols = torch.nonzero(foreground, as_tuple=True)
    return torch.stack([cols, rows], dim=-1).float()


def _row_distance_squared(foreground: Tensor) -> Tensor:
    """Squared distance from each pixel to the nearest foreground pixel of its row (inf if none)."""
    index = torch.arange(foreground.shape[-1], device=foreground.device, dtype=torch.float32).expand(foreground.shape)
    before = torch.where(foreground, index, -math.inf).cummax(dim=-1).values
    after = torch.where(foreground, index, math.inf).flip(-1).cummin(dim=-1).values.flip(-1)
    return torch.minimum(index - before, after - index).square()


def _min_plus_along_last(f: Tensor) -> Tensor:
    """``out[..., y] = min_y' (y - y')^2 + f[..., y']``: the second pass of the separable EDT."""
    n = f.shape[-1]
    index = torch.arange(n, device=f.device, dtype=f.dtype)
    penalty = (index[:, None] - index[None, :]).square()
    out = torch.empty_like(f)
    rows = max(1, 2**22 // (n * n))  # bounds the [rows, n, n] intermediate
    for i in range(0, f.shape[0], rows):
        out[i : i + rows] = (f[i : i + rows, None, :] + penalty).amin(dim=-1)
    return out


def _distance_field(foreground: Tensor) -> Tensor:
    """Euclidean distance from every pixel centre to the nearest foreground pixel centre.

    Exact: the squared distance separates into the distance along the row, then a min over
    rows of (row offset)^2 + that (Felzenszwalb and Huttenlocher's decomposition).
    """
    return _min_plus_along_last(_row_distance_squared(foreground).T.contiguous()).T.sqrt()


def _distance_to_set(field: Tensor, xy: Tensor) -> Tensor:
    """Distance from points ``xy [..., 2]`` (pixels) to the pixel set behind ``field``.

    Bilinear between pixel centres; beyond the canvas, the distance from the nearest canvas
    point plus the distance to it, so that points outside are still pulled back.
    """
    h, w = field.shape
    upper = xy.new_tensor([w - 1, h - 1])
    inside = torch.minimum(xy.clamp(min=0), upper)
    grid = (2 * inside + 1) / xy.new_tensor([w, h]) - 1
    sampled = F.grid_sample(
        field[None, None], grid.reshape(1, -1, 1, 2), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.reshape(xy.shape[:-1]) + torch.linalg.vector_norm(xy - inside, dim=-1)


def _subsample(points: Tensor, max_points: int, seed: int) -> Tensor:
    if points.shape[0] <= max_points:
        return points
    # A CPU generator gives the same subset whichever device the mask is on.
    index = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
    return points[index.to(points.device)]


def _moments(points: Tensor) -> tuple[Tensor, float, float]:
    """Centroid, principal-axis angle (defined modulo pi) and RMS radius of a point set."""
    centroid = points.mean(dim=0)
    centred = points - centroid
    cov = centred.T @ centred / points.shape[0]
    axis = 0.5 * math.atan2(2.0 * float(cov[0, 1]), float(cov[0, 0] - cov[1, 1]))
    return centroid, axis, math.sqrt(float(cov[0, 0] + cov[1, 1]))


def _rotated(v: Tensor, angle: float) -> Tensor:
    """``R(angle) @ v`` for one 2-vector, R as in Eq. (8)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return torch.stack([cos * v[0] - sin * v[1], sin * v[0] + cos * v[1]])


def fit_similarity_transform(
    mask_r: Tensor,
    mask_g: Tensor,
    *,
    iterations: int = 100,
    lr: float = 0.05,
    max_points: int = 4096,
    seed: int = 0,
    symmetric: bool = True,
    init: tuple[float, float, float, float] | None = None,
) -> SimilarityFit:
    """Fit ``T_theta`` of Eq. (8) so that ``T_theta(M_r)`` best matches ``M_g`` (Eq. (9), Algorithm 4).

    Args:
        mask_r: reference mask ``[H_r, W_r]``; foreground is ``> 0.5`` (nonzero if bool).
        mask_g: generated mask ``[H_g, W_g]``; its size may differ from ``mask_r``'s.
        iterations: Adam steps from each start.
        lr: Adam's initial learning rate (cosine-annealed to 0). The parameters are
            log-scale, angle in radians and a shift in units of the generated shape's
            RMS radius, so one rate suits masks of any size.
        max_points: the means run over at most this many points of each set, drawn at
            random (the distances are still to the full sets).
        seed: seed of that draw.
        symmetric: minimise the symmetric Chamfer distance (default). ``False`` minimises
            Algorithm 4's one-sided objective, which collapses (see the module docstring).
        init: ``(scale, angle, tx, ty)`` to start from instead of the moment-based starts.

    The objective is the squared Chamfer distance of Algorithm 4, made symmetric:
    ``mean_p d(T(p), P(M_g))^2 + mean_q d(q, T(P(M_r)))^2``. Rather than a point-to-point
    nearest-neighbour search, the distance to a full pixel set is read from its exact
    Euclidean distance field, bilinearly between pixel centres (classic chamfer matching),
    and for a similarity ``d(q, T(P(M_r))) = scale * d(T^-1(q), P(M_r))``. This costs
    O(points) per step instead of O(N M), and, unlike a Chamfer distance between two
    random subsamples, has no pull towards shrinking: a subsample's nearest-neighbour gaps
    narrow as it is scaled down, whereas a distance field is 0 over the whole foreground.

    The moment-based starts put the reference centroid on the generated centroid, scale by
    ``sqrt(area_g / area_r)`` and rotate by the difference of the principal-axis angles
    plus each multiple of 90 degrees (180 for the axis's sign ambiguity, 90 for shapes
    whose two second moments are close). Each start is refined by Adam and the one with
    the lowest final objective is kept.

    Raises:
        ValueError: if either mask is not 2-D or has no foreground pixel, ``lr`` is not a
            positive number, or ``init`` is not finite with a positive scale. (Non-finite
            parameters must not reach ``grid_sample``: its CPU backward crashes on NaN.)
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if init is not None and not (all(math.isfinite(v) for v in init) and init[0] > 0):
        raise ValueError(f"init must be finite with a positive scale, got {init}")
    # A fitting routine: it needs autograd for its own parameters even when the caller runs
    # under no_grad or inference_mode. Nothing of the caller's requires grad.
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(mask_r, mask_g, iterations, lr, max_points, seed, symmetric, init)


@attrs.frozen(eq=False)
class ChamferProblem:
    """What Eq. 9's objective needs of the two masks, computed once before the fit.

    ``p_centred`` are reference points less their centroid ``c_r``, ``q`` generated points
    (centroid ``c_g``), ``unit`` the shift's unit (the generated shape's RMS radius), and
    ``field_r``, ``field_g`` the exact distance fields of the two pixel sets.
    """

    p_centred: Tensor
    q: Tensor
    c_r: Tensor
    c_g: Tensor
    unit: float
    field_r: Tensor
    field_g: Tensor


def chamfer_distances(theta: Tensor, problem: ChamferProblem) -> tuple[Tensor, Tensor]:
    """Per start ``[K, N]`` and ``[K, M]``: d(T(p), P(M_g)) and d(q, T(P(M_r))) for parameters ``[K, 4]``.

    The optimised model, centred on both centroids so that rotation and scale barely move the
    shape's position: ``T(p) = c_g + unit * shift + scale * R(angle) @ (p - c_r)``, with
    ``theta = (log scale, angle, shift_x, shift_y)``.
    """
    scale = torch.exp(theta[:, 0])
    cos, sin = torch.cos(theta[:, 1]), torch.sin(theta[:, 1])
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [K, 2, 2]
    offset = problem.c_g + problem.unit * theta[:, None, 2:]
    # Row vectors: p @ R^T is R @ p, and (q - offset) @ R is R^-1 @ (q - offset).
    forward = scale[:, None, None] * (problem.p_centred @ rotation.mT) + offset
    backward = ((problem.q - offset) @ rotation) / scale[:, None, None] + problem.c_r
    return (_distance_to_set(problem.field_g, forward),
            scale[:, None] * _distance_to_set(problem.field_r, backward))


def chamfer_objective(theta: Tensor, problem: ChamferProblem, *, symmetric: bool = True) -> Tensor:
    """Eq. 9 as the fit minimises it: the squared Chamfer distance of T_theta(P(M_r)) to P(M_g), per start ``[K]``.

    ``mean_p d(T(p), P(M_g))^2``, plus ``mean_q d(q, T(P(M_r)))^2`` when ``symmetric`` (the
    default; Algorithm 4's one-sided form collapses, see the module docstring).
    """
    to_g, to_r = chamfer_distances(theta, problem)
    out = to_g.square().mean(dim=-1)
    return out + to_r.square().mean(dim=-1) if symmetric else out


def _fit(
    mask_r: Tensor,
    mask_g: Tensor,
    iterations: int,
    lr: float,
    max_points: int,
    seed: int,
    symmetric: bool,
    init: tuple[float, float, float, float] | None,
) -> SimilarityFit:
    fg_r = _foreground_2d(mask_r, "mask_r")
    fg_g = _foreground_2d(mask_g, "mask_g")
    p_all, q_all = _points(fg_r), _points(fg_g)
    c_r, axis_r, _ = _moments(p_all)
    c_g, axis_g, rms_g = _moments(q_all)
    field_r, field_g = _distance_field(fg_r), _distance_field(fg_g)
    p_centred = _subsample(p_all, max_points, seed) - c_r
    q = _subsample(q_all, max_points, seed)
    # Parameter unit for the shift: the generated RMS radius makes Adam's steps mean the
    # same for any mask size (>= 1 px so that a one-pixel mask does not divide by zero).
    unit = max(rms_g, 1.0)

    # The fit's model is centred on both centroids (chamfer_distances): rotating about the
    # image origin, as Eq. (8) does, would couple rotation and scale with position.
    if init is None:
        scale0 = math.sqrt(q_all.shape[0] / p_all.shape[0])
        starts = [(math.log(scale0), axis_g - axis_r + k * math.pi / 2, 0.0, 0.0) for k in range(4)]
    else:
        scale0, angle0, tx0, ty0 = init
        # Eq. (8) gives scale * R @ (p + t) = scale * R @ (p - c_r) + scale * R @ (c_r + t).
        moved = scale0 * _rotated(c_r + c_r.new_tensor([tx0, ty0]), angle0)
        shift0 = (moved - c_g) / unit
        starts = [(math.log(scale0), angle0, float(shift0[0]), float(shift0[1]))]
    params = torch.tensor(starts, dtype=q.dtype, device=q.device)
    problem = ChamferProblem(p_centred=p_centred, q=q, c_r=c_r, c_g=c_g, unit=unit, field_r=field_r, field_g=field_g)
    params.requires_grad_(True)
    optimiser = torch.optim.Adam([params], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(iterations, 1))
    for _ in range(iterations):
        optimiser.zero_grad()
        # Starts are independent: summing their losses keeps each one's gradient its own,
        # and Adam's update is elementwise, so this is K separate fits run as one batch.
        chamfer_objective(params, problem, symmetric=symmetric).sum().backward()
        optimiser.step()
        schedule.step()
    params = params.detach()

    with torch.no_grad():
        best = int(chamfer_objective(params, problem, symmetric=symmetric).argmin())
        to_g, to_r = chamfer_distances(params[best : best + 1], problem)
    residual = 0.5 * float(to_g.mean() + to_r.mean())
    log_scale, angle, dx, dy = (float(v) for v in params[best])
    scale = math.exp(log_scale)
    angle = math.atan2(math.sin(angle), math.cos(angle))
    # Back to Eq. (8)'s parameters: scale * R @ t = c_g + unit * shift - scale * R @ c_r.
    offset = (c_g + unit * c_g.new_tensor([dx, dy])) / scale
    t = _rotated(offset, -angle) - c_r
    tx, ty = float(t[0]), float(t[1])
    return SimilarityFit(
        scale=scale,
        angle=angle,
        tx=tx,
        ty=ty,
        matrix=similarity_matrix(torch.tensor(scale, dtype=torch.float32, device=mask_r.device), angle, tx, ty),
        residual=residual,
    )
