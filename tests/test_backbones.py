"""Every backbone of the registry, checked against keras.applications' own model (issue 25.1)."""

import keras
import numpy as np
import pytest

from tfcovid import config
from tfcovid.inference import explain
from tfcovid.models import BACKBONES, apply_freeze, build_model, count_parameters, is_head_layer
from tfcovid.models.freeze import CONVOLUTIONS, _all_layers
from tfcovid.weights import keras_files

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

    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False,
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    first_conv = next(layer for layer in _all_layers(model) if isinstance(layer, CONVOLUTIONS))
    before = first_conv.kernel.numpy().copy()
    loss = model.train_on_batch(pixels, np.eye(2, dtype="float32"))
    assert np.isfinite(loss) and not np.allclose(first_conv.kernel.numpy(), before)

    model.save(tmp_path / "m.keras")
    again = keras_files.load_model(tmp_path / "m.keras")
    assert keras_files.preprocessing_of(tmp_path / "m.keras") == spec.imagenet_preprocessing
    np.testing.assert_allclose(again.predict(pixels, verbose=0), model.predict(pixels, verbose=0),
                               rtol=1e-5, atol=1e-5)
