"""Scaled SVD (ICC paper Sec. 3.4): low-rank factors A B ~ W weighted by channel statistics."""

from __future__ import annotations

import torch

SCALE_EPS = 1e-6
SVD_KINDS = ("plain", "ca", "cd", "cf")  # plain SVD, or scaled by activation / difference / forecast statistics
SCALES = ("both", "input", "output")  # which side of W the CA/CD scaling weighs


def check_rank(rank: object, allow_none: bool = False) -> None:
    """A factor rank: a non-negative integer or "full" (None too where the factor file's ranks apply)."""
    if rank is None and allow_none or rank == "full":
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        extra = ", None (the factor file's ranks)" if allow_none else ""
        raise ValueError(f"rank must be a non-negative integer or 'full'{extra}, got {rank!r}")


def parse_rank(text: str | None) -> int | str | None:
    """A rank from the command line: an integer, "full", or None (not given)."""
    if text is None or text == "full":
        return text
    try:
        rank = int(text)
    except ValueError as e:
        raise ValueError(f"--rank must be a non-negative integer or 'full', got {text!r}") from e
    check_rank(rank)
    return rank


def scale_weight(
    weight: torch.Tensor,
    s_in: torch.Tensor | None = None,
    s_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(diag(s_o) W diag(s_i), s_o + 1e-6, s_i + 1e-6) in float64; a missing side is a unit scale (None).

    float64: the factors are unscaled again by ratios of up to ~1e3 between channels, which would
    lift float32's rounding of the SVD above the 1e-4 a reconstruction must hold on any CPU."""
    w = weight.detach().double()
    c_out, c_in = w.shape
    so = None if s_out is None else s_out.detach().double().to(w.device) + SCALE_EPS
    si = None if s_in is None else s_in.detach().double().to(w.device) + SCALE_EPS
    if so is not None and so.shape != (c_out,) or si is not None and si.shape != (c_in,):
        raise ValueError(f"scales must have shapes ({c_out},) and ({c_in},) for a {c_out}x{c_in} weight")
    for v in (so, si):
        if v is not None and not (torch.isfinite(v).all() and (v > 0).all()):
            raise ValueError("channel scales must be finite and positive; re-run the calibration statistics")
    if so is not None:
        w = so[:, None] * w
    if si is not None:
        w = w * si[None, :]
    return w, so, si


def scaled_singular_values(
    weight: torch.Tensor,
    s_in: torch.Tensor | None = None,
    s_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Singular values of diag(s_o) W diag(s_i), descending, without forming U and V (rank budgets); float32."""
    return torch.linalg.svdvals(scale_weight(weight, s_in, s_out)[0]).float()


def scaled_decomposition(
    weight: torch.Tensor,
    s_in: torch.Tensor | None = None,
    s_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full-rank scaled SVD: (A (C_o, k), singular values (k,), B (k, C_i)), k = min(C_o, C_i), computed
    in float64 and returned in float32.

    `svd(diag(s_o) W diag(s_i)) = U S V^T`, `A = diag(s_o)^-1 U S` (S merged into A),
    `B = V^T diag(s_i)^-1`. Columns come in descending singular value, so the first r columns of
    A and rows of B are the rank-r factors, and S^2 is the (scaled) energy each rank unit keeps.
    1e-6 is added to each scale vector before use (the authors' code does the same).
    """
    w_scaled, so, si = scale_weight(weight, s_in, s_out)
    u, s, vh = torch.linalg.svd(w_scaled, full_matrices=False)
    a = u * s
    b = vh
    if so is not None:
        a = a / so[:, None]
    if si is not None:
        b = b / si[None, :]
    return a.float().contiguous(), s.float(), b.float().contiguous()


def scaled_svd(
    weight: torch.Tensor,
    rank: int,
    s_in: torch.Tensor | None = None,
    s_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (C_o, r), B (r, C_i) from svd(diag(s_o) W diag(s_i)), S merged into A, in float32.

    `A = diag(s_o)^-1 U_r S_r`, `B = V_r^T diag(s_i)^-1`. Without scales this is the plain
    truncated SVD, the best rank-r approximation of W in Frobenius norm; with scales it is the
    best one under the weighted norm, so channels with large |activation| or |difference| (CA/CD)
    are kept more accurately. 1e-6 is added to each scale vector before use.
    """
    c_out, c_in = weight.shape
    if not 0 <= rank <= min(c_out, c_in):
        raise ValueError(f"rank {rank} is outside 0..{min(c_out, c_in)} for a {c_out}x{c_in} weight")
    a, _, b = scaled_decomposition(weight, s_in, s_out)
    return truncate(a, b, rank)


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` factors of a decomposition ordered by singular value (exact, no recomputation)."""
    return a[:, :rank].contiguous(), b[:rank].contiguous()
