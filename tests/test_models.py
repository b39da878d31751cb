"""Models: one registry, the study's heads and parameter counts, freeze policies."""

import numpy as np
import keras
import pytest

from tfcovid.models import BACKBONES, apply_freeze, build_model, count_parameters, get_backbone, is_head_layer


# The later backbones are checked by tests/test_backbones.py (one build each).
@pytest.mark.parametrize("name", ["vgg16", "resnet18", "resnet50"])
@pytest.mark.parametrize("outputs", [2, 3])
def test_forward_pass_every_backbone(name, outputs):
    size = max(32, BACKBONES[name].min_size)
    model = build_model(name, outputs, size)
    pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("uint8")
    logits = model.predict(pixels, verbose=0)
    assert logits.shape == (2, outputs) and logits.dtype == np.float32 and np.isfinite(logits).all()
    assert model.get_layer("head_fc1").units == 110


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(ValueError, match="Unknown backbone 'vgg19'. Valid backbones: convnext_tiny, densenet121, "
                       "efficientnetv2_b0, resnet18, resnet50, vgg16"):
        get_backbone("vgg19")


@pytest.mark.parametrize("name, outputs, expected", [
    ("vgg16", 2, 17_474_700), ("vgg16", 3, 17_474_811), ("resnet18", 2, 11_233_164),
])
def test_parameter_counts_at_224_match_the_study(name, outputs, expected):
    assert count_parameters(build_model(name, outputs, 224)) == expected


def test_vgg16_first7_trainable_count():
    model = build_model("vgg16", 2, 224)
    summary = apply_freeze(model, "first7", is_head_layer)
    assert (summary.trainable_params, summary.total_params) == (15_739_212, 17_474_700)
    assert summary.frozen_layers == ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
                                     "block3_conv1", "block3_conv2", "block3_conv3")


def test_freeze_all_and_none():
    model = build_model("vgg16", 2, 64)
    head = 512 * 2 * 2 * 110 + 110 + 110 * 2 + 2
    assert apply_freeze(model, "all", is_head_layer).trainable_params == head
    assert apply_freeze(model, "none", is_head_layer).trainable_params == count_parameters(model)


def test_resnet_first_n_freezes_batchnorm_with_its_conv():
    model = build_model("resnet18", 2, 32)
    summary = apply_freeze(model, "first2", is_head_layer)
    assert summary.frozen_layers == ("conv1", "bn1", "layer1_0_conv1", "layer1_0_bn1")
    assert not model.get_layer("bn1").trainable and model.get_layer("layer1_0_bn2").trainable
    stem = 7 * 7 * 3 * 64 + 2 * 64 + 3 * 3 * 64 * 64 + 2 * 64
    assert summary.trainable_params == count_parameters(model) - stem


def test_frozen_batchnorm_runs_in_inference_mode():
    model = build_model("resnet18", 2, 32)
    apply_freeze(model, "all", is_head_layer)
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    before = model.get_layer("bn1").moving_mean.numpy().copy()
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.get_layer("bn1").moving_mean.numpy(), before)


def test_bad_freeze_policies():
    model = build_model("vgg16", 2, 32)
    with pytest.raises(ValueError, match="asks for 14 conv layers but tfcovid_vgg16 has 13"):
        apply_freeze(model, "first14", is_head_layer)
    with pytest.raises(ValueError, match="Unknown freeze policy 'half'"):
        apply_freeze(model, "half", is_head_layer)


def test_image_too_small_for_vgg():
    with pytest.raises(ValueError, match="too small for vgg16: use at least 32 px"):
        build_model("vgg16", 2, 16)


@pytest.mark.parametrize("mode", ["caffe", "torch", "none"])
def test_preprocessing_inside_model_survives_save(tmp_path, mode):
    model = build_model("resnet18", 2, 32, preprocessing=mode)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert again.get_layer("preprocess").mode == mode
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_preprocess_modes_match_formulas():
    from tfcovid.models import Preprocess
    x = np.array([[[[10.0, 20.0, 30.0]]]], np.float32)
    np.testing.assert_allclose(Preprocess("caffe")(x)[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5)
    np.testing.assert_allclose(Preprocess("torch")(x)[0, 0, 0],
                               [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225], rtol=1e-5)
    np.testing.assert_allclose(Preprocess("none")(x), x)


def test_from_scratch_convs_are_initialised_like_torchvision():
    from tfcovid.models import init_like_torchvision
    model = build_model("vgg16", 2, 32)
    assert init_like_torchvision(model, seed=0) == 13
    kernel = model.get_layer("block5_conv3").kernel.numpy()  # fan_out = 3 * 3 * 512
    assert abs(kernel.std() - (2.0 / (9 * 512)) ** 0.5) < 0.002
    assert not model.get_layer("block5_conv3").bias.numpy().any()
    head = model.get_layer("head_fc1").kernel.numpy()  # the head keeps Glorot uniform
    assert abs(head.std() - (2.0 / (512 + 110)) ** 0.5) < 0.005
