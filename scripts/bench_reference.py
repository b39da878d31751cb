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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", help="image folder (default: generate --images files)")
    parser.add_argument("--images", type=int, default=300, help="files to generate without DATA")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _need_torchvision()
    import torch

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
