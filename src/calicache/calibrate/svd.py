"""Scaled SVD (ICC paper Sec. 3.4): low-rank factors A B ~ W weighted by channel statistics."""

from __future__ import annotations

import torch

SCALE_EPS = 1e-6


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
    w = weight.detach().float()
    c_out, c_in = w.shape
    if not 0 <= rank <= min(c_out, c_in):
        raise ValueError(f"rank {rank} is outside 0..{min(c_out, c_in)} for a {c_out}x{c_in} weight")
    so = None if s_out is None else s_out.detach().float() + SCALE_EPS
    si = None if s_in is None else s_in.detach().float() + SCALE_EPS
    if so is not None and so.shape != (c_out,) or si is not None and si.shape != (c_in,):
        raise ValueError(f"scales must have shapes ({c_out},) and ({c_in},) for a {c_out}x{c_in} weight")
    w_scaled = w
    if so is not None:
        w_scaled = so[:, None] * w_scaled
    if si is not None:
        w_scaled = w_scaled * si[None, :]
    u, s, vh = torch.linalg.svd(w_scaled, full_matrices=False)
    a = u[:, :rank] * s[:rank]
    b = vh[:rank]
    if so is not None:
        a = a / so[:, None]
    if si is not None:
        b = b / si[None, :]
    return a.contiguous(), b.contiguous()
