"""The shipped model's quality bar: class agreement and in-domain Frechet distance of its samples.

    python benchmarks/model_quality.py --model fmnist-dit --num 1000 --steps 50 --cfg-scales 2,3,4

Samples (DDIM by default, `--sampler`; adm spacing, classes index % 10) are classified by the
shipped classifier (overall and per class agreement with the class each sample was drawn for); the
Frechet distance in its feature space is measured against the Fashion-MNIST test set, next to the
distance between the training and test sets (10,000 training images) and that of as many training
images as samples (`fd_real_at_num`: the floor a perfect generator would reach at this sample count,
since the estimate is biased upward on few samples). A second,
independent judge: 5-nearest-neighbour voting among the 60k training images in pixel space
(`knn_agreement`, per class in `knn_per_class`), next to its accuracy on the real test images (the same
judge on real data: what a perfect generator would score, per class too).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import calicache
from calicache.data import FASHION_MNIST_CLASSES
from calicache.data.fashion_mnist import load_fashion_mnist
from calicache.images import to_uint8
from calicache.metrics.domain import domain_metrics, knn_predict
from calicache.training.classifier import load_classifier, predict_uint8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scales", default="2,3,4")
    p.add_argument("--sampler", default="ddim", help="ddim, ddpm or dpmpp_2m (calicache.sample's samplers)")
    p.add_argument("--clip-denoised", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = calicache.load_model(args.model)
    clf = load_classifier()
    test, test_labels = load_fashion_mnist("test")
    train, train_labels = load_fashion_mnist("train")
    floor = domain_metrics(clf, train[:10000], reference=test)["fd"]
    # The same distance from as many real images as samples: FD is biased upward at small sample counts,
    # so this, not the 10k floor, is what a perfect generator would score here.
    real_at_num = domain_metrics(clf, train[np.random.default_rng(0).choice(len(train), args.num, replace=False)],
                                 reference=test)["fd"]
    knn_test = knn_predict(train, train_labels, test)

    def per_class(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {name: round(float((pred[labels == k] == k).mean()), 4) for k, name in enumerate(FASHION_MNIST_CLASSES)}

    clip = {"auto": None, "yes": True, "no": False}[args.clip_denoised]
    rows = []
    for g in (float(s) for s in args.cfg_scales.split(",")):
        t0 = time.perf_counter()
        x = calicache.sample(model, args.num, args.steps, sampler=args.sampler, cfg_scale=g, batch_size=250,
                             clip_denoised=clip, progress=True)
        images = to_uint8(x)[..., 0]
        labels = np.arange(args.num) % 10
        m = domain_metrics(clf, images, labels=labels, reference=test)
        classes = per_class(predict_uint8(clf, images), labels)
        knn = knn_predict(train, train_labels, images)
        rows.append({"cfg_scale": g, "class_agreement": m["class_agreement"], "fd": m["fd"], "is": m["is"],
                     "worst_class": min(classes, key=classes.get), "per_class_agreement": classes,
                     "knn_agreement": round(float((knn == labels).mean()), 4), "knn_per_class": per_class(knn, labels),
                     "wall_seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    out = {"model": args.model, "num": args.num, "steps": args.steps, "sampler": args.sampler,
           "fd_train_vs_test": floor, "fd_real_at_num": real_at_num,
           "knn_test_accuracy": round(float((knn_test == test_labels).mean()), 4),
           "knn_test_per_class": per_class(knn_test, test_labels), "rows": rows}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
