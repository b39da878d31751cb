"""ImageNet weights, offline-first: keras.applications' files in the Keras cache (hash-checked,
never deleted), torchvision's ResNet18 converted; a missing file names what to fetch and where.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras

from tfcovid.weights.assign import WeightsError

KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


DOWNLOAD_TIMEOUT_S = 30  # per socket operation: an unreachable host fails in seconds, not minutes


@dataclass(frozen=True)
class ImagenetFile:
    """One published ImageNet weights file."""

    fname: str
    url: str
    md5: str | None = None  # full md5, checked by keras.utils.get_file (Keras's own hashes)
    sha256_prefix: str | None = None  # torchvision's check: sha256 starts with the name's hash
    sha256: str | None = None  # full sha256, checked by keras.utils.get_file (Keras's ConvNeXt files)

    @property
    def keras_hash(self) -> str | None:
        """The hash keras.utils.get_file checks (it tells md5 from sha256 by length)."""
        return self.md5 or self.sha256


# The Keras entries are keras.applications' own notop files and md5s; torchvision names its
# files after the first 8 hex digits of their sha256 and checks just that prefix.
IMAGENET = {
    "vgg16": ImagenetFile("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                          KERAS_BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                          md5="6d6bbae143d832006294945121d1f1fc"),
    "resnet50": ImagenetFile("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             KERAS_BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="4d473c1dd8becc155b73f8504c6f6626"),
    "densenet121": ImagenetFile("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                KERAS_BASE + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                md5="30ee3e1110167f948a6b9946edeeb738"),
    "efficientnetv2_b0": ImagenetFile("efficientnetv2-b0_notop.h5",
                                      KERAS_BASE + "efficientnet_v2/efficientnetv2-b0_notop.h5",
                                      md5="893217f2bb855e2983157299931e43ff"),
    "convnext_tiny": ImagenetFile("convnext_tiny_notop.h5", KERAS_BASE + "convnext/convnext_tiny_notop.h5",
                                  sha256="d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
    "resnet18": ImagenetFile("resnet18-f37072fd.pth",
                             "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                             sha256_prefix="f37072fd"),
}


def keras_cache_dir() -> Path:
    """Where ImageNet weights are kept: ``$KERAS_HOME/models`` (default ``~/.keras/models``).

    Read at call time (Keras reads KERAS_HOME once, at import) and passed to get_file, so the
    folder named in messages is always the one used.
    """
    base = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not os.access(base, os.W_OK):
        base = Path(tempfile.gettempdir()) / ".keras"  # what keras.utils.get_file falls back to
    return base / "models"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # keras.utils.get_file has no timeout argument; urllib uses the process default.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def fetch_imagenet(backbone: str) -> Path:
    """The ImageNet weights file for ``backbone``, from Keras's cache or downloaded into it.

    Raises:
        WeightsError: no such weights, download failed (offline) or the file's hash is wrong.
    """
    if backbone not in IMAGENET:
        raise WeightsError(f"No ImageNet weights are known for {backbone!r}; known: "
                           f"{', '.join(IMAGENET)}. Use --weights none or --weights FILE.")
    spec = IMAGENET[backbone]
    folder = keras_cache_dir()
    cached = folder / spec.fname
    if cached.exists():
        # Checked here, not by get_file: on a hash mismatch Keras deletes the file (even one a
        # user copied in by hand) while trying to download it again.
        _check_hash(cached, spec)
        return cached
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            path = Path(keras.utils.get_file(spec.fname, spec.url, cache_dir=str(folder.parent),
                                             cache_subdir=folder.name, file_hash=spec.keras_hash))
    except Exception as err:  # get_file raises a bare Exception wrapping URLError/HTTPError
        if cached.exists():  # downloaded, but Keras found the wrong md5 (it removes partial files)
            _check_hash(cached, spec)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"Could not download the ImageNet weights for {backbone}: {spec.fname} from "
            f"{spec.url} ({reason}).\nOffline? Download that file elsewhere and put it in "
            f"{folder}/ (Keras's cache; set KERAS_HOME to use another folder), or pass "
            "--weights FILE (a .keras, .weights.h5, keras.applications .h5, or torchvision "
            ".safetensors/.pth file), or --weights none to train from scratch."
        ) from None
    if not spec.keras_hash:  # get_file checked Keras's hash; torchvision's sha256 prefix is ours
        _check_hash(path, spec)
    return path


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(path: Path, spec: ImagenetFile) -> None:
    """Raise WeightsError, leaving the file where it is, when ``path`` is not ``spec``'s file."""
    try:
        if spec.md5:
            digest = _file_digest(path, "md5")
            good, shown, expected = digest == spec.md5, f"md5 is {digest}", spec.md5
        elif spec.sha256:
            digest = _file_digest(path, "sha256")
            good, shown, expected = digest == spec.sha256, f"sha256 is {digest}", spec.sha256
        elif spec.sha256_prefix:
            digest = _file_digest(path, "sha256")
            good = digest.startswith(spec.sha256_prefix)
            shown, expected = f"sha256 is {digest[:16]}...", f"{spec.sha256_prefix}..."
        else:
            return
    except OSError as err:
        raise WeightsError(f"Could not read {path}: {err}. Delete or replace it and run again.") from None
    if not good:
        raise WeightsError(
            f"{path} is damaged or not {spec.fname}: its {shown}, expected {expected}. "
            f"Delete it and run again to re-download from {spec.url}, or replace it with a "
            "good copy of that file.")
