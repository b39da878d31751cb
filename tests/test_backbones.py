"""Every backbone of the registry, checked against keras.applications' own model (issue 25.1)."""

import hashlib
import inspect
import re

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcovid import config
from tfcovid.inference import explain, export
from tfcovid.models import (
    BACKBONES,
    apply_freeze,
    build_model,
    count_parameters,
    is_head_layer,
)
from tfcovid.models.freeze import CONVOLUTIONS, _all_layers
from tfcovid.weights import imagenet, keras_files, loading
from tfcovid.weights.assign import WeightsError

A = keras.applications

# keras.applications' model without its top, and the preprocessing Keras applies to raw pixels
# for its ImageNet weights (EfficientNetV2 and ConvNeXt: inside the model). ResNet18 is not in
# keras.applications: torchvision's resnet18 has 11,689,512 parameters, 513,000 of them its fc.
REFERENCE = {
    "vgg16": (lambda s: A.VGG16(include_top=False, weights=None, input_shape=(s, s, 3)),
              A.vgg16.preprocess_input),
    "resnet50": (lambda s: A.ResNet50(include_top=False, weights=None, input_shape=(s, s, 3)),
                 A.resnet50.preprocess_input),
    "densenet121": (lambda s: A.DenseNet121(include_top=False, weights=None, input_shape=(s, s, 3)),
                    A.densenet.preprocess_input),
    "efficientnetv2_b0": (lambda s: A.EfficientNetV2B0(include_top=False, weights=None, input_shape=(s, s, 3)),
                          lambda x: x),
    "convnext_tiny": (lambda s: A.ConvNeXtTiny(include_top=False, weights=None, input_shape=(s, s, 3)),
                      lambda x: x),
}
TORCHVISION_RESNET18_NO_FC = 11_689_512 - 513_000

# What --freeze first2 freezes: up to the second convolution, with the normalisation after it
# (DenseNet's pre-activation BatchNorm goes with the conv before it).
FIRST2 = {
    "vgg16": ("block1_conv1", "block1_conv2"),
    "resnet18": ("conv1", "bn1", "layer1_0_conv1", "layer1_0_bn1"),
    "densenet121": ("conv1_conv", "conv1_bn", "conv2_block1_0_bn", "conv2_block1_1_conv", "conv2_block1_1_bn"),
    "efficientnetv2_b0": ("stem_conv", "stem_bn", "block1a_project_conv", "block1a_project_bn"),
    "convnext_tiny": ("convnext_tiny_stem_conv", "convnext_tiny_stem_layernorm",
                      "convnext_tiny_stage_0_block_0_depthwise_conv", "convnext_tiny_stage_0_block_0_layernorm"),
}


def _check_against_keras(name, model, features, pixels):
    """Parameter count = keras.applications' notop model + the study's head, and the same
    feature map from raw pixels (so the normalisation is applied exactly once)."""
    head = count_parameters(model) - count_parameters(features)
    fc1 = model.get_layer("head_fc1")
    assert head == fc1.kernel.shape[0] * 110 + 110 + 110 * 2 + 2
    if name == "resnet18":
        assert count_parameters(features) == TORCHVISION_RESNET18_NO_FC
        return
    build, preprocess = REFERENCE[name]
    reference = build(pixels.shape[1])
    assert count_parameters(model) == count_parameters(reference) + head
    reference.set_weights(features.get_weights())
    want = reference(preprocess(pixels.astype("float32").copy()), training=False)
    got = features(pixels, training=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _check_tables(name, model):
    """config's tables, the stages and Grad-CAM's default layer, against the built model."""
    spec = BACKBONES[name]
    backbone = [layer for layer in _all_layers(model) if layer.weights and not is_head_layer(layer)]
    assert config.CONV_LAYERS[name] == sum(isinstance(layer, CONVOLUTIONS) for layer in backbone)
    assert config.MIN_IMAGE_SIZE[name] == spec.min_size and config.STAGES[name] == len(spec.stages)
    stage_of = {layer.name: [i for i, stage in enumerate(spec.stages) if layer.name.startswith(stage)]
                for layer in backbone}
    assert {n: s for n, s in stage_of.items() if len(s) != 1} == {}  # each layer in exactly one stage
    assert [s[0] for s in stage_of.values()] == sorted(s[0] for s in stage_of.values())  # in order
    everything = apply_freeze(model, "all", is_head_layer)
    last = apply_freeze(model, f"stages{len(spec.stages)}", is_head_layer, spec.stages)
    assert last.frozen_layers == everything.frozen_layers
    first = apply_freeze(model, "stages1", is_head_layer, spec.stages)
    assert 0 < len(first.frozen_layers) < len(last.frozen_layers)
    with pytest.raises(ValueError, match=f"asks for {len(spec.stages) + 1} stages but"):
        apply_freeze(model, f"stages{len(spec.stages) + 1}", is_head_layer, spec.stages)
    if name in FIRST2:
        assert apply_freeze(model, "first2", is_head_layer).frozen_layers == FIRST2[name]
    apply_freeze(model, "none", is_head_layer)
    assert explain.default_layer(model) == spec.gradcam_layer
    assert len(model.get_layer(spec.gradcam_layer).output.shape) == 4
    with pytest.raises(ValueError, match=f"too small for {name}: use at least {spec.min_size} px"):
        build_model(name, 2, spec.min_size - 1)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_matches_keras_trains_saves_and_reloads(name, tmp_path):
    spec = BACKBONES[name]
    size = spec.min_size
    keras.utils.set_random_seed(0)
    model = build_model(name, 2, size, spec.imagenet_preprocessing)
    pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("uint8")
    head_input = model.get_layer("head_flatten" if spec.pooling == "flatten" else "head_avgpool").input
    _check_against_keras(name, model, keras.Model(model.input, head_input), pixels)
    _check_tables(name, model)

    # One SGD step, eagerly (a compiled train step costs a trace of the whole graph).
    first_conv = next(layer for layer in _all_layers(model) if isinstance(layer, CONVOLUTIONS))
    before = first_conv.kernel.numpy().copy()
    with tf.GradientTape() as tape:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)(np.eye(2), model(pixels, training=True))
    keras.optimizers.SGD(0.1).apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    assert np.isfinite(float(loss)) and not np.allclose(first_conv.kernel.numpy(), before)

    model.save(tmp_path / "m.keras")
    again = keras_files.load_model(tmp_path / "m.keras")
    assert keras_files.preprocessing_of(tmp_path / "m.keras") == spec.imagenet_preprocessing
    np.testing.assert_allclose(again(pixels, training=False), model(pixels, training=False), rtol=1e-5, atol=1e-5)


# --- ImageNet weights of the later backbones: Keras's files, offline, damaged, loaded by order ---

LATER = ("densenet121", "efficientnetv2_b0", "convnext_tiny")


def test_imagenet_table_matches_keras_applications_for_the_later_backbones():
    from keras.src.applications import convnext, densenet, efficientnet_v2

    table = imagenet.IMAGENET
    assert table["densenet121"].url == densenet.DENSENET121_WEIGHT_PATH_NO_TOP
    assert f'file_hash="{table["densenet121"].md5}"' in inspect.getsource(densenet)  # inline in Keras
    assert table["efficientnetv2_b0"].url == efficientnet_v2.BASE_WEIGHTS_PATH + "efficientnetv2-b0_notop.h5"
    assert table["efficientnetv2_b0"].md5 == efficientnet_v2.WEIGHTS_HASHES["b0"][1]
    assert table["convnext_tiny"].url == convnext.BASE_WEIGHTS_PATH + "convnext_tiny_notop.h5"
    assert table["convnext_tiny"].sha256 == convnext.WEIGHTS_HASHES["convnext_tiny"][1]
    assert all(table[name].url.endswith("/" + table[name].fname) for name in LATER)


@pytest.mark.parametrize("backbone", LATER)
def test_later_backbones_offline_or_damaged_cache_is_a_clear_error(backbone, monkeypatch, tmp_path):
    """No network: the file, its URL and the folder to put it in; a wrong copy in the cache: its
    hash and the expected one, and the file is kept. Both before any model is built."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = imagenet.IMAGENET[backbone]

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://x: None -- [Errno -3] Temporary failure in name resolution")  # noqa: TRY002 (as get_file)

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError) as err:
        loading.initial_model(backbone, 2, 32, "imagenet")
    for part in (f"for {backbone}: {spec.fname} from {spec.url}", str(tmp_path / "keras" / "models"),
                 "Temporary failure in name resolution", "--weights FILE", "--weights none"):
        assert part in str(err.value)
    cached = tmp_path / "keras" / "models" / spec.fname
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"a truncated copy")
    with pytest.raises(WeightsError) as err:
        loading.initial_model(backbone, 2, 32, "imagenet")
    algorithm = "sha256" if spec.sha256 else "md5"
    digest = hashlib.new(algorithm, b"a truncated copy").hexdigest()
    assert (f"{cached} is damaged or not {spec.fname}: its {algorithm} is {digest}, expected "
            f"{spec.md5 or spec.sha256}") in str(err.value)
    assert cached.read_bytes() == b"a truncated copy"


def test_convnext_notop_h5_loads_by_order_with_its_unnamed_final_norm(monkeypatch, tmp_path):
    """keras.applications' own .h5 (as --weights FILE and as the ImageNet file): loaded by layer
    order, the final LayerNormalization included, and the features equal Keras's own model's
    (which normalises inside) on the same raw pixels."""
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(3)
    source = A.ConvNeXtTiny(include_top=False, weights=None, input_shape=(32, 32, 3))
    norm = source.layers[-1]
    norm.set_weights([w + 0.5 for w in norm.get_weights()])
    path = tmp_path / "convnext_tiny_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    assert loading.resolve_preprocessing("convnext_tiny", str(path)) == "torch"
    model, mode, origin = loading.initial_model("convnext_tiny", 2, 32, str(path))
    assert mode == "torch" and origin == f"Keras .h5 weights from {path} (loaded by keras.applications; fresh study head)"
    for got, want in zip(model.get_layer("convnext_tiny_layernorm").get_weights(), norm.get_weights()):
        np.testing.assert_array_equal(got, want)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    features = keras.Model(model.input, model.get_layer("head_avgpool").input)
    np.testing.assert_allclose(features(pixels), source(pixels), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(loading, "fetch_imagenet", lambda backbone: path)
    model, _, origin = loading.initial_model("convnext_tiny", 2, 32, "imagenet")
    assert origin == "Keras ImageNet weights (convnext_tiny_notop.h5)"
    np.testing.assert_allclose(keras.Model(model.input, model.get_layer("head_avgpool").input)(pixels),
                               source(pixels), rtol=1e-4, atol=1e-4)
    want = model(pixels)
    # A Keras 3 .weights.h5 of it: the nested Sequential blocks' weights are found inside them.
    model.save_weights(tmp_path / "last.weights.h5")
    again, _, origin = loading.initial_model("convnext_tiny", 2, 32, str(tmp_path / "last.weights.h5"))
    assert "study head loaded from the file" in origin
    np.testing.assert_allclose(again(pixels), want, rtol=1e-5, atol=1e-5)
    with h5py.File(tmp_path / "other.h5", "w") as f:  # a legacy .h5 of some other model
        f.attrs["layer_names"] = [b"dense"]
        f.create_group("dense").attrs["weight_names"] = [b"dense/kernel:0"]
        f["dense"].create_dataset("dense/kernel:0", data=np.zeros((3, 3), "float32"))
    with pytest.raises(WeightsError, match=rf"Could not load {tmp_path / 'other.h5'} into convnext_tiny: .*"
                                           r"Use keras.applications' convnext_tiny notop .h5"):
        loading.initial_model("convnext_tiny", 2, 32, str(tmp_path / "other.h5"))


@pytest.mark.parametrize("freeze, error", [
    ("stages4", None), ("stages5", "convnext_tiny has 4 stages: use stages1 ... stages4, all"),
    ("stages0", "Valid values: all, none, firstN"), ("first22", None),
    ("first23", "convnext_tiny has 22 conv layers: use first1 ... first22"),
])
def test_stages_and_first_are_checked_against_the_backbone_before_building(freeze, error):
    overrides = {"model.backbone": "convnext_tiny", "model.freeze": freeze}
    if error is None:
        assert config.resolve(None, overrides).model.freeze == freeze
    else:
        with pytest.raises(config.ConfigError, match=rf"Bad value for 'model.freeze': '{freeze}'\. .*{re.escape(error)}"):
            config.resolve(None, overrides)


def test_onnx_export_of_what_tf2onnx_cannot_convert_is_refused_up_front(tmp_path, monkeypatch):
    """ConvNeXt's grouped convolutions and GELU (a tiny model with both stands in): a clear error
    naming them and the formats that work, before any conversion, and no half-written folder."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Activation("gelu")(keras.layers.Conv2D(3, 3, groups=3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    model.save(tmp_path / "m.keras")
    assert export.onnx_unsupported(model) == ["GELU (Erfc)", "grouped convolutions (Conv2D with groups > 1)"]
    monkeypatch.setattr(export, "onnx_missing", list)
    with pytest.raises(export.ExportError, match=r"tf2onnx cannot convert its GELU \(Erfc\) and grouped "
                                                 r"convolutions .* Use --format saved_model or tflite"):
        export.export(tmp_path / "m.keras", tmp_path / "onnx", "onnx", task="binary", labels=["a", "b"],
                      log=lambda line: None)
    assert not (tmp_path / "onnx").exists()
    plain = keras.Model(inputs, keras.layers.Conv2D(3, 3)(inputs))
    assert export.onnx_unsupported(plain) == []
