"""Evaluation: the ADM suite (FID, sFID, IS, precision/recall with Inception-v3), fidelity to the
uncached run (PSNR, SSIM, MSE), in-domain metrics with a Fashion-MNIST classifier, CLIP score.

Import the submodule you need (see docs/evaluation.md): `fidelity.fidelity(a, b)`,
`frechet.frechet_distance`, `adm.inception_score`, `adm.precision_recall`,
`inception.InceptionExtractor`, `suite.adm_metrics`, `domain.domain_metrics`, `clip.clip_score`.
"""
