#!/usr/bin/env python
"""The study's torchvision loader on the same files as ``tfcovid bench pipeline``.

This is the baseline tfcovid's input pipeline is compared with: ImageFolder's PIL loader
(every image converted to RGB at full size) with the study's train transforms,
RandomRotation(30) -> RandomResizedCrop(S) -> RandomHorizontalFlip -> ToTensor -> Normalize,
in a DataLoader with shuffle=True, for each --workers setting (the study used 0).

It needs torch and torchvision (``pip install torch torchvision``), which tfcovid itself does
not; without them it says so and exits with status 2.

    python scripts/bench_reference.py DIR [--image-size 224] [--batch-size 60] [--workers 0 2]
    python scripts/bench_reference.py --images 300          # the files tfcovid bench generates
    python scripts/bench_reference.py TREE --train vgg16 --freeze 7 --epochs 2 --workers 16 --json

With --train, the study's training loop itself (issue 26.4), on a GPU when there is one: the
torchvision model (vgg16 or resnet18, random weights, the study's head: 110 hidden units, ReLU,
2 logits; --freeze N: the first N convolutions frozen, the study's "first7"), SGD lr 1e-3
momentum 0.9, cross-entropy, batch --batch-size, the loader above on TREE/train with
num_workers = --workers (default: all cores), then a validation pass on TREE/validation (Resize
to S x S) after every epoch, as the study's notebook does. It reports each epoch's seconds, the
train images/s and the wall time; for fewer epochs than --part1-epochs (12) it also gives that
run's wall time extrapolated from the mean epoch (marked as such). --amp bf16 runs the model
under torch.autocast(bfloat16) (tfcovid's --precision auto on such GPUs); the study used float32.

DIR is an ImageFolder tree (its train/ split is used when there is one) or any folder of images.
Each figure is the median over --epochs full passes, each including the workers' start-up, as
in the study's training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _need_torchvision():
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as err:  # ImportError, or a torchvision build that does not match torch
        sys.stderr.write(
            "scripts/bench_reference.py needs torch and torchvision to run the study's loader "
            f"(pip install torch torchvision); not available here: {err}\n")
        sys.exit(2)


def _loader(paths, image_size, batch_size, workers):
    import torch
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomRotation(30),
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])

    class Files(torch.utils.data.Dataset):
        """ImageFolder's behaviour on a plain list: PIL open, convert("RGB"), transform."""

        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as fh:
                image = Image.open(fh).convert("RGB")
            return transform(image), i % 2

    return torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=workers)


def _reference_model(name: str, freeze: int):
    """The torchvision model with the study's head, its first ``freeze`` convolutions frozen."""
    import torch
    from torch import nn
    from torchvision import models

    if name == "vgg16":
        model = models.vgg16(weights=None)
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 110), nn.ReLU(), nn.Linear(110, 2))
    else:
        model = models.resnet18(weights=None)
        model.fc = nn.Sequential(nn.Linear(512, 110), nn.ReLU(), nn.Linear(110, 2))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs[:freeze]:
        for parameter in conv.parameters():
            parameter.requires_grad = False
    return model


def _train_reference(args) -> dict:
    """The study's training loop on TREE: per-epoch seconds, images/s, wall time."""
    import torch
    from torchvision import datasets, transforms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = args.workers[0] if args.workers != [0, 2] else (os.cpu_count() or 1)
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomRotation(30), transforms.RandomResizedCrop(args.image_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor(), norm])
    train = datasets.ImageFolder(os.path.join(args.data, "train"), train_tf)
    val = datasets.ImageFolder(os.path.join(args.data, "validation"), val_tf)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=workers > 0)
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size, num_workers=workers,
                                             pin_memory=device == "cuda", persistent_workers=workers > 0)
    model = _reference_model(args.train, args.freeze).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    epochs, start = [], time.perf_counter()
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.eval()
        correct = 0
        with torch.no_grad(), amp:
            for x, y in val_loader:
                correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        epochs.append({"train_s": round(t1 - t0, 2), "epoch_s": round(time.perf_counter() - t0, 2),
                       "val_accuracy": round(correct / max(len(val), 1), 4)})
    wall = time.perf_counter() - start
    mean_epoch = statistics.mean(e["epoch_s"] for e in epochs)
    later = [e["train_s"] for e in epochs[1:]] or [epochs[0]["train_s"]]
    return {"kind": "reference_train", "model": args.train, "freeze_first_convs": args.freeze,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "amp": args.amp,
            "num_workers": workers, "batch_size": args.batch_size, "image_size": args.image_size,
            "train_images": len(train), "validation_images": len(val), "epochs": epochs,
            "train_images_per_s": round(len(train) / statistics.median(later), 1),
            "wall_s": round(wall, 2), "part1_epochs": args.part1_epochs,
            "part1_wall_s" if len(epochs) >= args.part1_epochs else "part1_wall_s_extrapolated":
                round(mean_epoch * args.part1_epochs, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", help="image folder (default: generate --images files)")
    parser.add_argument("--images", type=int, default=300, help="files to generate without DATA")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--train", choices=("vgg16", "resnet18"), help="run the study's training loop on DATA")
    parser.add_argument("--freeze", type=int, default=0, help="--train: first N convolutions frozen")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--part1-epochs", type=int, default=12)
    args = parser.parse_args(argv)
    _need_torchvision()
    import torch

    if args.train:
        if not args.data:
            parser.error("--train needs DATA, an ImageFolder tree with train/ and validation/")
        report = {**_train_reference(args), "torch": torch.__version__,
                  "torchvision": sys.modules["torchvision"].__version__, "cpu_count": os.cpu_count()}
        print(json.dumps(report, indent=2) if args.json else
              f"{args.train}: {report['train_images_per_s']} train images/s, {report['wall_s']} s for "
              f"{len(report['epochs'])} epochs")
        return 0

    from tfcovid import bench  # the same file discovery and generator as tfcovid bench

    with tempfile.TemporaryDirectory(prefix="tfcovid-reference-") as tmp:
        if args.data:
            paths, source = bench.image_files(args.data), args.data
        else:
            paths = bench.synthetic_xrays(tmp, args.images)
            source = f"generated: {args.images} grayscale 1024x1024 JPEGs"
        for path in paths:  # page cache, as tfcovid bench does
            with open(path, "rb") as fh:
                fh.read()
        results = []
        for workers in args.workers:
            seconds = []
            for _ in range(args.epochs):
                start = time.perf_counter()
                for _batch in _loader(paths, args.image_size, args.batch_size, workers):
                    pass
                seconds.append(time.perf_counter() - start)
            rate = len(paths) / statistics.median(seconds)
            results.append({"num_workers": workers, "images_per_s": round(rate, 1)})
            if not args.json:
                print(f"torchvision loader, num_workers={workers}: {rate:.1f} images/s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report = {"kind": "reference", "loader": "torchvision ImageFolder loader + RandomRotation(30) + "
              "RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize",
              "data": source, "images": len(paths), "image_size": args.image_size,
              "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
              "load_average_1min": round(load, 2), "torch": torch.__version__,
              "torchvision": getattr(sys.modules.get("torchvision"), "__version__", "?"), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
