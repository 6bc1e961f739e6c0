"""In-domain metrics with a Fashion-MNIST classifier in the role Inception-v3 plays for ImageNet.

The classifier is any nn.Module with `model(x) -> logits (N, K)` and `model.features(x) -> (N, D)`
for x float (N, 1, 28, 28) in [-1, 1] (calicache.training.classifier.load_classifier() gives the shipped
one). Metrics: class agreement with the labels the samples were drawn for, the Frechet distance
of classifier features to a reference set, and the Inception-Score analogue of its logits.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .adm import inception_score
from .frechet import feature_frechet_distance

IMAGE_SIZE = 28


def classifier_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28), (N, 28, 28, 1) or (N, 28, 28, 3) -> float (N, 1, 28, 28) in [-1, 1].

    Three channels are reduced to luma with the ITU-R BT.601 weights in PIL's integer form,
    (299 R + 587 G + 114 B + 500) // 1000 (PIL's `convert("L")`), which gives back a
    grayscale-replicated image (as in samples.npz) exactly.
    """
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"the Fashion-MNIST classifier takes uint8 images, got {a.dtype}; convert with "
                         "calicache.images.to_uint8 (or ((x + 1) * 127.5).round().astype(uint8))")
    if a.ndim == 4 and a.shape[-1] == 3:
        a = (a[..., 0].astype(np.int32) * 299 + a[..., 1].astype(np.int32) * 587
             + a[..., 2].astype(np.int32) * 114 + 500) // 1000
    elif a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3 or a.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"the Fashion-MNIST classifier takes {IMAGE_SIZE}x{IMAGE_SIZE} images (N, 28, 28[, 1 or 3]), "
                         f"got shape {np.asarray(images).shape}")
    return torch.from_numpy(a.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0  # a copy: inputs may be read-only


@torch.inference_mode()
def classifier_pass(fns, images: np.ndarray, batch_size: int = 500, desc: str = "classifier") -> list[np.ndarray]:
    """Each of `fns` (e.g. `model`, `model.features`) over uint8 images in batches: float64 (N, ...) arrays,
    one per function, flattened to (N, D)."""
    x = classifier_input(images)
    if len(x) == 0:
        raise ValueError("no images given to the classifier")
    outs: list[list[torch.Tensor]] = [[] for _ in fns]
    for start in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, disable=len(x) <= batch_size):
        xb = x[start : start + batch_size]
        for out, fn in zip(outs, fns):
            out.append(fn(xb).flatten(1).double())
    return [torch.cat(out).numpy() for out in outs]


def classifier_outputs(model: torch.nn.Module, images: np.ndarray, batch_size: int = 500,
                       desc: str = "classifier") -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), features (N, D)) as float64 numpy arrays."""
    logits, feats = classifier_pass([model, model.features], images, batch_size, desc)
    return logits, feats


def class_agreement(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples the classifier puts in the class they were generated for."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(logits):
        raise ValueError(f"{len(labels)} labels for {len(logits)} images")
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def domain_metrics(model: torch.nn.Module, samples: np.ndarray, labels: np.ndarray | None = None,
                   reference: np.ndarray | None = None, fd_method: str = "sqrtm") -> dict:
    """{"class_agreement", "fd", "is", "num_reference", "notes"} for uint8 sample images.

    `labels` (the classes the samples were drawn for) and `reference` (uint8 images) are optional;
    a metric that cannot be computed is None with a note saying why.
    """
    logits, feats = classifier_outputs(model, samples, desc="classifier (samples)")
    out: dict = {"class_agreement": None, "fd": None, "is": inception_score(logits), "num_reference": None,
                 "notes": []}
    if labels is not None:
        out["class_agreement"] = class_agreement(logits, labels)
    else:
        out["notes"].append("class agreement needs the sampled labels (arr_1 in the samples npz)")
    if reference is not None:
        _, ref_feats = classifier_outputs(model, reference, desc="classifier (reference)")
        out["fd"] = feature_frechet_distance(feats, ref_feats, method=fd_method)
        out["num_reference"] = int(len(reference))
    else:
        out["notes"].append("feature Frechet distance needs 28x28 reference images (--ref)")
    return out


def knn_predict(train: np.ndarray, train_labels: np.ndarray, images: np.ndarray, k: int = 5,
                batch_size: int = 500) -> np.ndarray:
    """A second judge that shares nothing with the classifier: the majority label of the `k` nearest
    training images in pixel space (Euclidean distance on the classifier's [-1, 1] input; a tied
    vote goes to the smallest label). On Fashion-MNIST with the 60k training images and k = 5 it
    classifies 85.5% of the test images correctly; it reads shape, not texture, so a blob that the
    CNN still places in a class lands with whatever it resembles."""
    if k < 1 or k > len(train):
        raise ValueError(f"k = {k} must be in 1..{len(train)} (the number of training images)")
    ref = classifier_input(train).flatten(1)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    num_classes = int(labels.max()) + 1
    ref_sq = ref.square().sum(1)
    out = []
    for i in range(0, len(images), batch_size):
        x = classifier_input(images[i:i + batch_size]).flatten(1)
        d = ref_sq[None, :] - 2 * x @ ref.T  # |x - r|^2 up to the per-row constant |x|^2
        nearest = labels[d.topk(k, dim=1, largest=False).indices]
        votes = torch.nn.functional.one_hot(nearest, num_classes).sum(1)
        out.append(votes.argmax(1).numpy())  # argmax returns the first maximum: the smallest tied label
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
