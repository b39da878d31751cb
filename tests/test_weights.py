"""Starting weights and the PyTorch import: parity against a torchvision-layout reference,
local Keras files, ImageNet downloads (offline) and every failure message."""

import builtins
import functools
import hashlib
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from tfcovid.weights import keras_files, torch_files, assign as weights_assign, imagenet, import_torch as weights_import_torch, loading
from tfcovid.cli import main
from tfcovid.models import build_model
from tfcovid.weights.assign import WeightsError

sys.path.insert(0, str(Path(__file__).parent))

TASK_OUTPUTS = {"binary": 2, "multilabel": 3}


@pytest.fixture(autouse=True)
def _keras_home(tmp_path, monkeypatch):
    """Downloads (and their failures) go to a private Keras cache, never ~/.keras."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))


@pytest.fixture(scope="module")
def ref():
    """tests/torch_reference.py (needs torch, which the test extra installs)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    import torch_reference

    return torch_reference


@pytest.fixture(scope="module")
def pixels():
    """Two raw 224x224 RGB images in [0, 255], as tfcovid's pipeline feeds the model."""
    return np.random.default_rng(7).integers(0, 256, (2, 224, 224, 3)).astype(np.uint8)


def assert_parity(want, got):
    """The issue's tolerance: max |difference| <= 1e-4 x the logits' scale."""
    scale = float(np.abs(want).max())
    assert got.shape == want.shape
    assert float(np.abs(want[0] - want[1]).max()) > 1e-3 * scale  # the images are told apart
    assert float(np.abs(got - want).max()) <= 1e-4 * scale, (want, got)


@functools.lru_cache(maxsize=None)
def torch_shapes(backbone):
    """{torch key: shape} of a backbone, from tfcovid's model (built once per backbone)."""
    layout = torch_files.backbone_layout(build_model(backbone, 2, 32), backbone)
    return {key: shape for entries in layout.values() for key, shape, _ in entries}


def fake_state(backbone, num_outputs, head=True, seed=0):
    """A torchvision-layout state dict (NumPy) with the study's head, made without torch."""
    rng = np.random.default_rng(seed)
    state = {key: rng.normal(size=shape).astype(np.float32) for key, shape in torch_shapes(backbone).items()}
    root = torch_files.HEAD_ROOT[backbone]
    if head:
        features = 25088 if backbone == "vgg16" else 512
        state.update({f"{root}.0.weight": rng.normal(size=(110, features)).astype(np.float32),
                      f"{root}.0.bias": rng.normal(size=110).astype(np.float32),
                      f"{root}.2.weight": rng.normal(size=(num_outputs, 110)).astype(np.float32),
                      f"{root}.2.bias": rng.normal(size=num_outputs).astype(np.float32)})
    return state


def run(model, x):
    """Inference-mode logits (a direct call: no tf.function tracing for a single batch)."""
    return np.asarray(model(np.asarray(x, np.float32), training=False))


def layer_weights(model, name):
    return [np.asarray(w) for w in model.get_layer(name).get_weights()]


# --- parity with the PyTorch reference (224 px, eval mode, BatchNorm statistics included) ---

@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg16", "resnet18"])
@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_import_matches_pytorch_logits_via_safetensors(backbone, task, ref, pixels, tmp_path):
    torch_model = ref.study_model(backbone, TASK_OUTPUTS[task], seed=len(task))
    checkpoint = tmp_path / "study.safetensors"
    save_file(ref.state_dict_numpy(torch_model), str(checkpoint))
    state = torch_files.read_state_dict(checkpoint)
    model = build_model(backbone, TASK_OUTPUTS[task], 224, "torch")
    converted = torch_files.convert(state, model, backbone, require_head=True)
    assert converted.head == "study"
    weights_assign.assign(model, converted.arrays, str(checkpoint), require_head=True)
    assert_parity(ref.logits(torch_model, pixels), run(model, pixels.astype("float32")))


@pytest.mark.slow
def test_import_torch_command_from_pth_loads_and_predicts(ref, pixels, tmp_path):
    import torch

    torch_model = ref.study_model("resnet18", 3, seed=3)
    checkpoint = tmp_path / "resnet18_bce.pth"
    torch.save(torch_model.state_dict(), checkpoint)
    out = tmp_path / "models" / "resnet18_bce.keras"
    result = CliRunner().invoke(main, ["import-torch", str(checkpoint), "--backbone", "resnet18",
                                       "--task", "multilabel", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "covid-19, normal, pneumonia" in result.output and out.is_file()
    from tfcovid.weights import metadata

    trained = metadata.load(out)  # how predict/evaluate/export load it, with its label info
    assert (trained.task, trained.outputs, trained.image_size) == ("multilabel", ("covid-19", "normal", "pneumonia"), 224)
    model = trained.model
    assert model.name == "tfcovid_resnet18_multilabel"
    assert model.get_layer("preprocess").mode == "torch" and keras_files.preprocessing_of(out) == "torch"
    assert_parity(ref.logits(torch_model, pixels), run(model, pixels.astype("float32")))
    again = CliRunner().invoke(main, ["import-torch", str(checkpoint), "--backbone", "resnet18",
                                      "--task", "multilabel", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_imagenet_checkpoint_loads_as_backbone_with_fresh_head(ref, tmp_path):
    """A 1000-class torchvision ResNet18 (as torchvision saves it): backbone exact, fc dropped."""
    import torch

    torch_model = ref.randomize_(ref.ResNet18(), seed=5).eval()
    checkpoint = tmp_path / "resnet18-imagenet.pth"
    torch.save(torch_model.state_dict(), checkpoint)
    model, mode, origin = loading.initial_model("resnet18", 2, 64, str(checkpoint))
    assert mode == "torch"
    assert "dropped the ImageNet classifier (fc (1000, 512))" in origin and "fresh study head" in origin
    assert model.get_layer("head_logits").kernel.shape == (110, 2)
    x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    features = keras.Model(model.input, model.get_layer("layer4_1_out").output)
    with torch.no_grad():
        want = torch_model.features(ref.normalise(x)).permute(0, 2, 3, 1).numpy()
    got = run(features, x.astype("float32"))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_vgg16_imagenet_classifier_is_dropped_and_refused_by_import():
    state = fake_state("vgg16", 2, head=False)
    # The real 1000-class classifier's shapes, without allocating its 120M parameters.
    for key, shape in (("classifier.0.weight", (4096, 25088)), ("classifier.0.bias", (4096,)),
                       ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
                       ("classifier.6.weight", (1000, 4096)), ("classifier.6.bias", (1000,))):
        state[key] = np.broadcast_to(np.float32(0), shape)
    model = build_model("vgg16", 2, 32)
    converted = torch_files.convert(state, model, "vgg16", require_head=False)
    assert converted.head == "imagenet" and "head_fc1" not in converted.arrays
    assert "classifier.0 (4096, 25088)" in converted.notes[0]
    with pytest.raises(WeightsError, match="ImageNet classifier.*fit --weights FILE"):
        torch_files.convert(state, model, "vgg16", require_head=True)


def test_conversion_layout_rules():
    """OIHW -> HWIO, Linear transposed, VGG's (C, 7, 7) flatten order -> (7, 7, C)."""
    state = fake_state("vgg16", 2)
    model = build_model("vgg16", 2, 224)
    arrays = torch_files.convert(state, model, "vgg16", require_head=True).arrays
    np.testing.assert_array_equal(arrays["block1_conv1"][0], state["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(arrays["block5_conv3"][1], state["features.28.bias"])
    np.testing.assert_array_equal(arrays["head_logits"][0], state["classifier.2.weight"].T)
    kernel, w = arrays["head_fc1"][0], state["classifier.0.weight"]
    for h, wi, c in ((0, 0, 0), (3, 5, 7), (6, 6, 511)):  # Keras row (h, w, c) <- torch column (c, h, w)
        np.testing.assert_array_equal(kernel[(h * 7 + wi) * 512 + c], w[:, c * 49 + h * 7 + wi])


# --- failure messages: each names the key and both shapes ---

@functools.lru_cache(maxsize=None)
def small_model(backbone, num_outputs):
    return build_model(backbone, num_outputs, 32, "torch")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("layer1.0.conv1.weight"), "missing key layer1.0.conv1.weight, expected shape (64, 64, 3, 3)"),
    (lambda s: s.update({"layer5.0.conv1.weight": np.zeros((8, 8, 3, 3), np.float32)}),
     "unexpected key layer5.0.conv1.weight with shape (8, 8, 3, 3)"),
    (lambda s: s.update({"conv1.weight": np.zeros((64, 3, 3, 3), np.float32)}),
     "shape mismatch for conv1.weight: checkpoint (64, 3, 3, 3), model (64, 3, 7, 7)"),
    (lambda s: s.update({"bn1.running_var": np.ones(32, np.float32)}),
     "shape mismatch for bn1.running_var: checkpoint (32,), model (64,)"),
    (lambda s: s.update({"fc.2.weight": np.zeros((3, 110), np.float32), "fc.2.bias": np.zeros(3, np.float32)}),
     "shape mismatch for fc.2.weight: checkpoint (3, 110), model (2, 110)"),
    (lambda s: s.update({"fc.0.bias": np.zeros(64, np.float32)}),
     "head module fc.0 is not a Linear layer with bias: found fc.0.bias (64,), fc.0.weight (110, 512)"),
    (lambda s: s.update({"fc.0.running_mean": np.zeros(110, np.float32)}),
     "unexpected head key fc.0.running_mean with shape (110,)"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("fc.")], "no classifier, not the study's fine-tuned head"),
])
def test_import_errors_name_key_and_shapes(edit, message, tmp_path):
    state = fake_state("resnet18", 2)
    edit(state)
    checkpoint = tmp_path / "bad.safetensors"
    save_file(state, str(checkpoint))
    with pytest.raises(WeightsError) as err:
        torch_files.convert(torch_files.read_state_dict(checkpoint), small_model("resnet18", 2),
                             "resnet18", require_head=True, source=str(checkpoint))
    assert message in str(err.value) and str(checkpoint) in str(err.value)


def test_wrong_backbone_and_wrong_image_size_are_explained(tmp_path):
    with pytest.raises(WeightsError, match="looks like a vgg16 model: use --backbone vgg16"):
        torch_files.convert(fake_state("vgg16", 2), small_model("resnet18", 2), "resnet18", require_head=True)
    resnet50_like = {**fake_state("resnet18", 2), "layer1.0.conv3.weight": np.zeros((256, 64, 1, 1), np.float32)}
    with pytest.raises(WeightsError, match=r"unexpected key layer1.0.conv3.weight with shape \(256, 64, 1, 1\)"
                                           r"(?s:.*)looks like a ResNet with bottleneck blocks"):
        torch_files.convert(resnet50_like, small_model("resnet18", 2), "resnet18", require_head=True)
    save_file(fake_state("vgg16", 2), str(tmp_path / "vgg.safetensors"))
    with pytest.raises(WeightsError, match=r"7x7x512 feature map.*this model's is 2x2x512: use --image-size 224"):
        weights_import_torch.import_torch(tmp_path / "vgg.safetensors", "vgg16", "binary", tmp_path / "v.keras", image_size=64)
    # As starting weights (fit --weights FILE) the same file gives the backbone and a fresh head.
    model, mode, origin = loading.initial_model("vgg16", 2, 64, str(tmp_path / "vgg.safetensors"))
    assert mode == "torch" and "head was not loaded" in origin and "7x7x512" in origin


def test_import_torch_command_reports_errors_without_traceback(tmp_path):
    state = fake_state("resnet18", 2)
    state.pop("bn1.running_mean")
    save_file(state, str(tmp_path / "bad.safetensors"))
    result = CliRunner().invoke(main, ["import-torch", str(tmp_path / "bad.safetensors"), "--backbone",
                                       "resnet18", "--task", "binary", "--out", str(tmp_path / "m.keras"),
                                       "--image-size", "32"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error:" in result.output and "missing key bn1.running_mean, expected shape (64,)" in result.output


def test_pth_without_torch_says_how_to_install(monkeypatch, tmp_path):
    checkpoint = tmp_path / "study.pth"
    checkpoint.write_bytes(b"not read")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(WeightsError, match=r"needs PyTorch.*pip install 'tfcovid\[torch\]'.*safetensors"):
        torch_files.read_state_dict(checkpoint)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd.pth.*pip install 'tfcovid\[torch\]'"):
        loading.initial_model("resnet18", 2, 32, "imagenet")


def test_pth_forms(ref, tmp_path):
    import torch

    state = ref.study_model("resnet18", 2).state_dict()
    # Training-loop checkpoints and DataParallel's "module." prefix are unwrapped.
    wrapped = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    got = torch_files.read_state_dict(tmp_path / "wrapped.pth")
    assert set(got) == set(state)
    np.testing.assert_array_equal(got["layer2.0.downsample.1.running_var"],
                                  state["layer2.0.downsample.1.running_var"].numpy())
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pth")  # a whole pickled model
    with pytest.raises(WeightsError, match=r"weights_only=True.*model.state_dict\(\)"):
        torch_files.read_state_dict(tmp_path / "pickled_module.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        torch_files.read_state_dict(tmp_path / "list.pth")
    whole = (tmp_path / "wrapped.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])  # a download cut short
    with pytest.raises(WeightsError) as err:
        torch_files.read_state_dict(tmp_path / "cut.pth")
    assert "is damaged (e.g. cut short by a download) or not a torch.save file" in str(err.value)
    assert "pickled" not in str(err.value)  # that advice is for whole pickled models only


# --- Keras files as starting weights ---

def write_notop_h5(model, path, extra=(), full_model=False):
    """A keras.applications-style legacy .h5 (layer_names / weight_names attributes); with
    ``full_model`` the weights sit in a ``model_weights`` group, as Keras 2's model.save('x.h5')."""
    with h5py.File(path, "w") as root:
        f = root.create_group("model_weights") if full_model else root
        names = [layer.name for layer in model.layers] + [name for name, _ in extra]
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for layer in model.layers:
            g = f.create_group(layer.name)
            wnames = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            g.attrs["weight_names"] = [n.encode() for n in wnames]
            for n, w in zip(wnames, layer.get_weights()):
                g.create_dataset(n, data=w)
        for name, arrays in extra:
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"{name}/w{i}:0".encode() for i in range(len(arrays))]
            for i, a in enumerate(arrays):
                g.create_dataset(f"{name}/w{i}:0", data=a)


def test_keras_applications_notop_h5(tmp_path):
    keras.utils.set_random_seed(1)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.h5"
    write_notop_h5(source, path, extra=[("fc1", [np.zeros((512, 8), np.float32), np.zeros(8, np.float32)])])
    # The fixture is in the format keras.applications itself loads (checked without the extra top).
    write_notop_h5(source, tmp_path / "plain.h5")
    check = keras.applications.VGG16(include_top=False, weights=str(tmp_path / "plain.h5"), input_shape=(32, 32, 3))
    np.testing.assert_array_equal(check.get_layer("block3_conv2").get_weights()[0],
                                  source.get_layer("block3_conv2").get_weights()[0])

    model, mode, origin = loading.initial_model("vgg16", 2, 32, str(path))
    assert mode == "caffe"
    assert "dropped the ImageNet top (fc1)" in origin and "fresh study head" in origin
    for name in ("block1_conv1", "block5_conv3"):
        for got, want in zip(layer_weights(model, name), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    write_notop_h5(source, tmp_path / "keras2_model.h5", full_model=True)
    model, _, origin = loading.initial_model("vgg16", 2, 32, str(tmp_path / "keras2_model.h5"))
    np.testing.assert_array_equal(layer_weights(model, "block4_conv3")[0],
                                  source.get_layer("block4_conv3").get_weights()[0])


def test_keras_model_and_weights_h5_from_an_earlier_run(tmp_path):
    keras.utils.set_random_seed(2)
    source = build_model("resnet18", 2, 32, "caffe", name="tfcovid_resnet18_binary")
    bn = source.get_layer("layer3_1_bn2")
    bn.set_weights([w + np.random.default_rng(0).normal(size=w.shape).astype("float32") ** 2
                    for w in bn.get_weights()])  # non-trivial moving statistics
    source.save(tmp_path / "last.keras")
    source.save_weights(tmp_path / "last.weights.h5")
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    want = run(source, x)

    assert loading.resolve_preprocessing("resnet18", str(tmp_path / "last.keras")) == "caffe"
    model, mode, origin = loading.initial_model("resnet18", 2, 32, str(tmp_path / "last.keras"))
    assert mode == "caffe" and origin == f"Keras model from {tmp_path / 'last.keras'} (study head loaded from the file)"
    np.testing.assert_allclose(run(model, x), want, rtol=1e-6, atol=1e-6)
    # A .weights.h5 does not record the preprocessing: the backbone's ImageNet one is assumed.
    assert loading.resolve_preprocessing("resnet18", str(tmp_path / "last.weights.h5")) == "torch"
    model, _, origin = loading.initial_model("resnet18", 2, 32, str(tmp_path / "last.weights.h5"),
                                             preprocessing="caffe")
    np.testing.assert_allclose(run(model, x), want, rtol=1e-6, atol=1e-6)
    # Fine-tuning a binary model for the three-label task keeps the backbone, not the head.
    model, _, origin = loading.initial_model("resnet18", 3, 32, str(tmp_path / "last.weights.h5"))
    assert "head not loaded (head_logits/kernel: file (110, 2), model (110, 3)" in origin
    for got, want_w in zip(layer_weights(model, "layer3_1_bn2"), bn.get_weights()):
        np.testing.assert_array_equal(got, want_w)


def test_keras_applications_weights_h5_with_its_imagenet_top(tmp_path):
    """A keras.applications VGG16 saved with its classifier as .weights.h5 (dense, dense_1,
    dense_2 in the file, the last with 1000 classes): the top is dropped and said so, as for
    a legacy .h5, and the convolutions load. (A small top stands in for the 4096-unit one.)"""
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    x = keras.layers.Flatten()(base.output)
    x = keras.layers.Dense(8, activation="relu")(keras.layers.Dense(8, activation="relu")(x))
    full = keras.Model(base.input, keras.layers.Dense(1000, activation="softmax")(x))
    full.save_weights(tmp_path / "vgg_top.weights.h5")
    model, _, origin = loading.initial_model("vgg16", 2, 32, str(tmp_path / "vgg_top.weights.h5"))
    assert "dropped the ImageNet top (fc1, fc2, predictions)" in origin
    for name in ("block1_conv1", "block5_conv3"):
        for got, want in zip(layer_weights(model, name), base.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)


def test_keras_file_from_another_backbone_is_refused(tmp_path):
    resnet = small_model("resnet18", 2)
    resnet.save(tmp_path / "resnet.keras")
    resnet.save_weights(tmp_path / "resnet.weights.h5")
    with pytest.raises(WeightsError, match=r"(?s)resnet.keras does not fit .*missing layer block1_conv1 \(kernel \(3, 3, 3, 64\)"):
        loading.initial_model("vgg16", 2, 32, str(tmp_path / "resnet.keras"))
    with pytest.raises(WeightsError, match=r"not saved from a tfcovid_vgg16 model"):
        loading.initial_model("vgg16", 2, 32, str(tmp_path / "resnet.weights.h5"))


@pytest.mark.parametrize("name, message", [
    ("missing.keras", "Weights file not found"),
    ("notes.txt", "Unsupported weights file"),
])
def test_bad_weights_argument(name, message, tmp_path):
    if name.endswith(".txt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(WeightsError, match=message):
        loading.initial_model("resnet18", 2, 32, str(tmp_path / name))


# --- ImageNet: cache, checksum, offline ---

def test_offline_download_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    """A real download attempt to a host that never resolves (RFC 2606 .invalid)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    url = "http://tfcovid-offline.invalid/vgg16_notop.h5"
    monkeypatch.setitem(imagenet.IMAGENET, "vgg16", imagenet.ImagenetFile("vgg16_notop.h5", url, md5="0" * 32))
    with pytest.raises(WeightsError) as err:
        loading.initial_model("vgg16", 2, 32, "imagenet")
    message = str(err.value)
    for part in ("vgg16_notop.h5", url, str(tmp_path / "keras" / "models"), "--weights FILE", "--weights none"):
        assert part in message
    assert (tmp_path / "keras" / "models").is_dir() and not any((tmp_path / "keras" / "models").iterdir())


def test_offline_fit_stops_before_writing_a_run(monkeypatch, binary_tree, tmp_path):
    url = "http://tfcovid-offline.invalid/resnet50_notop.h5"
    monkeypatch.setitem(imagenet.IMAGENET, "resnet50", imagenet.ImagenetFile("resnet50_notop.h5", url))
    result = CliRunner().invoke(main, ["fit", "--data", str(binary_tree), "--backbone", "resnet50",
                                       "--weights", "imagenet", "--batch-size", "2", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: Could not download the ImageNet weights for resnet50: resnet50_notop.h5" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_download_error_from_keras_is_translated(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://x: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError, match=r"resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 from "
                                           r"https://storage.googleapis.com/.*Temporary failure"):
        loading.initial_model("resnet50", 2, 32, "imagenet")


def test_imagenet_resnet18_checks_torchvision_hash_prefix(monkeypatch, tmp_path):
    fake = tmp_path / "resnet18-f37072fd.pth"
    fake.write_bytes(b"not the real file")
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: str(fake))
    with pytest.raises(WeightsError, match=r"damaged or not resnet18-f37072fd.pth.*expected f37072fd"):
        imagenet.fetch_imagenet("resnet18")


def _no_download(*args, **kwargs):
    raise AssertionError("keras.utils.get_file must not be called: it deletes a cached file whose hash differs")


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_wrong_cached_keras_file_is_reported_and_kept(backbone, monkeypatch, tmp_path):
    """A file the user put in Keras's cache with the wrong md5: named with both hashes, never deleted."""
    spec = imagenet.IMAGENET[backbone]
    cached = tmp_path / "keras-home" / "models" / spec.fname
    cached.parent.mkdir(parents=True)
    content = b"an old or truncated copy of " + spec.fname.encode()
    cached.write_bytes(content)
    monkeypatch.setattr(keras.utils, "get_file", _no_download)
    with pytest.raises(WeightsError) as err:
        loading.initial_model(backbone, 2, 32, "imagenet")
    message = str(err.value)
    assert f"{cached} is damaged or not {spec.fname}" in message
    assert f"its md5 is {hashlib.md5(content).hexdigest()}, expected {spec.md5}" in message
    assert "Delete it and run again" in message and spec.url in message and "Could not download" not in message
    assert cached.read_bytes() == content


def test_wrong_cached_file_stops_fit_and_is_kept(monkeypatch, binary_tree, tmp_path):
    """The user's report, through the CLI and Keras's real get_file (which would delete the file)."""
    spec = imagenet.IMAGENET["vgg16"]
    cached = tmp_path / "keras-home" / "models" / spec.fname
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x89HDF\r\n not the published file")
    result = CliRunner().invoke(main, ["fit", "--data", str(binary_tree), "--backbone", "vgg16",
                                       "--weights", "imagenet", "--image-size", "32", "--epochs", "1",
                                       "--batch-size", "2", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {cached} is damaged or not {spec.fname}: its md5 is " in result.output
    assert f"expected {spec.md5}" in result.output
    assert "re-download" in result.output and "Could not download" not in result.output
    assert "A local file was found" not in result.output  # Keras's get_file never saw it
    assert cached.read_bytes() == b"\x89HDF\r\n not the published file"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cached_file_with_the_right_hash_is_used_without_get_file(monkeypatch, tmp_path):
    keras.utils.set_random_seed(5)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    cached = tmp_path / "keras-home" / "models" / "vgg16_notop.h5"
    cached.parent.mkdir(parents=True)
    write_notop_h5(source, cached)
    md5 = hashlib.md5(cached.read_bytes()).hexdigest()
    monkeypatch.setitem(imagenet.IMAGENET, "vgg16",
                        imagenet.ImagenetFile(cached.name, "https://example.invalid/v.h5", md5=md5))
    monkeypatch.setattr(keras.utils, "get_file", _no_download)
    model, mode, origin = loading.initial_model("vgg16", 2, 32, "imagenet")
    assert mode == "caffe" and origin == "Keras ImageNet weights (vgg16_notop.h5)"
    np.testing.assert_array_equal(layer_weights(model, "block5_conv3")[0],
                                  source.get_layer("block5_conv3").get_weights()[0])


def test_wrong_cached_resnet18_is_reported_before_download(monkeypatch, tmp_path):
    cached = tmp_path / "keras-home" / "models" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a download")
    monkeypatch.setattr(keras.utils, "get_file", _no_download)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd.pth is damaged or not resnet18-f37072fd.pth: "
                                           r"its sha256 is [0-9a-f]{16}\.\.\., expected f37072fd"):
        imagenet.fetch_imagenet("resnet18")
    assert cached.read_bytes() == b"half a download"


def test_downloaded_file_with_wrong_md5_is_reported_as_damaged(monkeypatch, tmp_path):
    """Keras keeps a completed download whose md5 differs and raises ValueError: say what it is."""
    spec = imagenet.IMAGENET["resnet50"]

    def corrupt_download(fname, origin, cache_dir, cache_subdir, file_hash):
        Path(cache_dir, cache_subdir).mkdir(parents=True, exist_ok=True)
        Path(cache_dir, cache_subdir, fname).write_bytes(b"a proxy's error page")
        raise ValueError(f"Incomplete or corrupted file detected. The md5 file hash does not match the "
                         f"provided value of {file_hash}.")

    monkeypatch.setattr(keras.utils, "get_file", corrupt_download)
    with pytest.raises(WeightsError, match=rf"{spec.fname} is damaged or not {spec.fname}: its md5 is "
                                           + hashlib.md5(b"a proxy's error page").hexdigest()):
        imagenet.fetch_imagenet("resnet50")


def test_imagenet_resnet18_is_torchvision_converted(ref, monkeypatch, tmp_path):
    import torch

    torch_model = ref.randomize_(ref.ResNet18(), seed=4)
    path = tmp_path / "resnet18.pth"
    torch.save(torch_model.state_dict(), path)
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(imagenet.IMAGENET, "resnet18",
                        imagenet.ImagenetFile(path.name, "https://example.invalid/r.pth", sha256_prefix=prefix))
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: str(path))
    model, mode, origin = loading.initial_model("resnet18", 2, 32, "imagenet")
    assert mode == "torch" and origin.startswith("torchvision ImageNet") and "dropped the ImageNet classifier" in origin
    np.testing.assert_allclose(layer_weights(model, "layer4_1_bn2")[3],
                               torch_model.layer4[1].bn2.running_var.numpy())


def test_imagenet_vgg16_uses_the_cached_keras_file(monkeypatch, tmp_path):
    keras.utils.set_random_seed(3)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    write_notop_h5(source, tmp_path / "notop.h5")
    calls = []
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: calls.append((a, k)) or str(tmp_path / "notop.h5"))
    model, mode, origin = loading.initial_model("vgg16", 2, 32, "imagenet")
    assert mode == "caffe" and "Keras ImageNet weights" in origin
    assert calls[0][0][0] == "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert calls[0][1] == {"cache_dir": str(tmp_path / "keras-home"), "cache_subdir": "models",
                           "file_hash": "6d6bbae143d832006294945121d1f1fc"}
    np.testing.assert_array_equal(layer_weights(model, "block4_conv1")[0], source.get_layer("block4_conv1").get_weights()[0])


def test_imagenet_table_matches_keras_applications():
    vgg16 = pytest.importorskip("keras.src.applications.vgg16")
    resnet = pytest.importorskip("keras.src.applications.resnet")
    assert imagenet.IMAGENET["vgg16"].url == vgg16.WEIGHTS_PATH_NO_TOP
    assert imagenet.IMAGENET["resnet50"].url == resnet.BASE_WEIGHTS_PATH + imagenet.IMAGENET["resnet50"].fname
    assert imagenet.IMAGENET["resnet50"].md5 == resnet.WEIGHTS_HASHES["resnet50"][1]


# --- preprocessing follows the weights ---

@pytest.mark.parametrize("backbone, weights_arg, expected", [
    ("vgg16", "imagenet", "caffe"), ("resnet50", "imagenet", "caffe"), ("resnet18", "imagenet", "torch"),
    ("vgg16", "none", "torch"), ("vgg16", "x.safetensors", "torch"), ("resnet18", "x.pth", "torch"),
])
def test_preprocessing_follows_the_weights(backbone, weights_arg, expected, tmp_path):
    if "." in weights_arg:
        (tmp_path / weights_arg).write_bytes(b"")
        weights_arg = str(tmp_path / weights_arg)
    assert loading.resolve_preprocessing(backbone, weights_arg) == expected
    assert loading.resolve_preprocessing(backbone, weights_arg, "none") == "none"


def test_resolved_weights_go_into_the_config(tmp_path, monkeypatch):
    from tfcovid import config

    fetched = []
    monkeypatch.setattr(loading, "fetch_imagenet", fetched.append)
    exp = config.resolve(None, {"model.backbone": "resnet50", "model.weights": "imagenet"})
    assert exp.model.preprocessing == "auto"
    assert loading.resolve_experiment_weights(exp).model.preprocessing == "caffe"
    assert fetched == ["resnet50"]  # before the run directory: offline fails before any writing
    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    exp = config.resolve(None, {"model.backbone": "vgg16", "model.weights": "w.safetensors"})
    resolved = loading.resolve_experiment_weights(exp).model
    assert (resolved.weights, resolved.preprocessing) == (str(tmp_path / "w.safetensors"), "torch")
    exp = config.resolve(None, {"model.weights": "gone.keras"})
    with pytest.raises(WeightsError, match="Weights file not found: gone.keras"):
        loading.resolve_experiment_weights(exp)
