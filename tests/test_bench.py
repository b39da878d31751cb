"""The benchmark: FLOP counts against published figures, result fields, CLI, reference script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfcovid import bench
from tfcovid.bench import timing
from tfcovid.cli import main
from tfcovid.models import apply_freeze, build_model, is_head_layer

REPO = Path(__file__).resolve().parents[1]


def test_vgg16_flops_match_the_published_figure():
    # torchvision's model card: VGG16 15.47 GFLOPS (multiply-adds) at 224 px, 1000 classes.
    macs = bench.model_flops(keras.applications.VGG16(weights=None))["forward_macs"]
    assert abs(macs - 15.47e9) / 15.47e9 < 0.003


def test_study_models_flops_exactly():
    convs = [(224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128), (56, 128, 256),
             (56, 256, 256), (56, 256, 256), (28, 256, 512), (28, 512, 512), (28, 512, 512),
             (14, 512, 512), (14, 512, 512), (14, 512, 512)]
    head = 7 * 7 * 512 * 110 + 110 * 2
    expected = sum(s * s * 9 * cin * cout for s, cin, cout in convs) + head
    flops = bench.model_flops(build_model("vgg16", 2, 224, "caffe"))
    assert flops["forward_macs"] == expected and flops["forward_flops"] == 2 * expected
    assert flops["train_flops"] == 3 * flops["forward_flops"] - 2 * convs[0][0] ** 2 * 9 * 3 * 64
    # ResNet18: torchvision's card says 1.81 GFLOPS; the study's head is a little smaller.
    r18 = bench.model_flops(build_model("resnet18", 2, 224, "torch"))["forward_macs"]
    assert abs(r18 - 1.814e9) / 1.814e9 < 0.005


def test_training_flops_skip_what_frozen_layers_need_not_compute():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = keras.layers.Conv2D(5, 3, padding="same", name="c2")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, name="d")(x)
    model = keras.Model(inputs, out)
    m1, m2, m3 = 8 * 8 * 9 * 2 * 4, 8 * 8 * 9 * 4 * 5, 8 * 8 * 5 * 3
    assert bench.model_flops(model)["train_flops"] == 2 * (m1 + m2 + m3) + 2 * (m1 + m2 + m3) + 2 * (m2 + m3)
    model.get_layer("c1").trainable = False  # no weight gradient, and nothing below needs its input gradient
    assert bench.model_flops(model)["train_flops"] == 2 * (m1 + m2 + m3) + 2 * (m2 + m3) + 2 * m3
    frozen = build_model("vgg16", 2, 32, "caffe")
    apply_freeze(frozen, "all", is_head_layer)
    f = bench.model_flops(frozen)
    head = 512 * 110 + 110 * 2
    assert f["train_flops"] == f["forward_flops"] + 2 * head + 2 * 110 * 2


def test_synthetic_xrays_are_distinct_grayscale_jpegs(tmp_path):
    paths = bench.synthetic_xrays(tmp_path, count=5, side=128)
    assert len(paths) == 5
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (128, 128)
            arrays.append(np.asarray(im))
    assert not np.array_equal(arrays[0], arrays[4])  # same base render, different grain/exposure


def test_image_files_reads_train_split_or_any_folder(binary_tree, tmp_path):
    files = bench.image_files(binary_tree)
    assert files and all("/train/" in f for f in files)
    with pytest.raises(Exception, match="No images"):
        bench.image_files(tmp_path)


def test_bench_pipeline_fields(tmp_path):
    paths = bench.synthetic_xrays(tmp_path, count=8, side=160)
    r = bench.bench_pipeline(paths, image_size=32, batch_size=4, repeats=1, log=lambda s: None, processes=0)
    for key in ("decode_only_images_per_s", "first_epoch_images_per_s", "later_epochs_images_per_s",
                "images_per_s"):
        assert r[key] > 0
    assert r["first_epoch_ratio"] == pytest.approx(r["first_epoch_images_per_s"] / r["decode_only_images_per_s"], abs=2e-3)
    assert r["images"] == 8 and r["image_size"] == 32 and r["batch_size"] == 4
    # 160 px gray JPEGs at S = 32, decode_scale 2: 1/2 scale (80 >= 64), one byte per pixel.
    assert 8 * 80 * 80 <= r["cache"]["bytes"] < 8 * 80 * 80 + 8 * 1024
    assert r["device"].startswith(("CPU", "GPU")) and r["cpu_count"] >= 1
    assert "Train pipeline on 8 images" in bench.summary({**r, "data": "x"})
    assert r["resample_processes"] == 0 and "worker processes" not in bench.summary({**r, "data": "x"})
    # The same cache bytes in 2 worker processes, and the summary says so.
    w = bench.bench_pipeline(paths, image_size=32, batch_size=4, repeats=1, log=lambda s: None, processes=2)
    assert w["resample_processes"] == 2 and w["cache"]["bytes"] == r["cache"]["bytes"]
    assert "of 2 resample processes" in w["cache"]["stored"]
    assert "in 2 worker processes" in bench.summary({**w, "data": "x"})
    assert w["resample_processes_setting"] == "2" and r["resample_processes_setting"] == "0"
    assert w["usable_cores"] == len(os.sched_getaffinity(0))
    # CPU per image and cores busy, per pass kind: real figures, within what the machine has.
    for result in (r, w):
        for key in ("decode_only", "first_epoch", "later_epochs"):
            assert result[f"{key}_cpu_ms_per_image"] > 0, key
            assert 0 < result[f"{key}_cores_busy"] <= result["cpu_count"] + 0.5, key
    assert "ms CPU per image" in bench.summary({**r, "data": "x"})


def test_worker_processes_cpu_is_counted():
    """The pipeline benchmark's CPU figures include the resample worker processes (read from
    /proc, to the nanosecond: a pass may last a few hundredths of a second), not just the
    training process's threads."""
    from tfcovid.data.opencv import process_pool

    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
            "print(time.process_time(), flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        own = float(proc.stdout.readline())  # the child's CPU time, by its own clock
        read = process_pool.process_cpu_seconds(proc.pid)
        assert own >= 0.5 and read == pytest.approx(own, abs=3e-3)  # ns, not 10 ms clock ticks
    finally:
        proc.kill()
        proc.wait()
    assert process_pool.process_cpu_seconds(-1) == 0.0  # no such process

    store = process_pool.WorkerStore(4, "train", processes=2)
    store.start(2, 32)
    try:
        started = store.cpu_seconds()  # two Pythons that imported NumPy and OpenCV
        assert started >= 0.05

        class Policy:
            stores = [store]

        with_workers, alone = timing.cpu_seconds(Policy), timing.cpu_seconds()
        assert with_workers - alone >= started - 0.02
    finally:
        store.close()


@pytest.mark.slow
def test_bench_model_and_fit_fields(tmp_path):
    data_dir = tmp_path / "imgs"
    bench.synthetic_xrays(data_dir, count=4, side=96)
    opts = {"backbone": "resnet18", "image_size": 32, "batch_size": 2, "steps": 1, "repeats": 1}
    m = bench.run("model", log=lambda s: None, **opts)
    assert m["kind"] == "model" and m["images_per_s"] > 0 and m["tflops"] > 0
    assert m["precision"] == "float32" and m["jit_compile"] is False and m["loss_scaling"] is False
    # Forward + both gradients, less the first conv's input gradient (nothing needs it).
    assert 2.8 * m["forward_gflops_per_image"] < m["train_gflops_per_image"] < 3 * m["forward_gflops_per_image"]
    f = bench.run("fit", str(data_dir), log=lambda s: None, precision="mixed_bfloat16", **opts)
    assert f["kind"] == "fit" and f["precision"] == "mixed_bfloat16"
    assert f["ratio_to_model_only"] == pytest.approx(f["images_per_s"] / f["model_only_images_per_s"], abs=2e-3)
    assert f["data"] == str(data_dir) and f["cache"]["bytes"] > 0
    assert "end to end" in bench.summary(f)
    # The device path with the 4 images resident: decoded once, no host cache filled. (Streamed
    # device batches are the pipeline's, tested in test_device_augment.)
    d = bench.run("fit", str(data_dir), log=lambda s: None, augment_on="device", **opts)
    assert d["augment_on"].startswith("augmentation on CPU:0 (in the train step")
    assert "; train images resident on the device: " in d["augment_on"]
    assert d["images_per_s"] > 0 and d["model_only_images_per_s"] > 0 and d["cache"]["bytes"] == 0


def test_cli_bench_pipeline_json(tmp_path):
    data_dir = tmp_path / "imgs"
    bench.synthetic_xrays(data_dir, count=6, side=128)
    result = CliRunner().invoke(main, ["bench", "pipeline", "--data", str(data_dir), "--image-size", "32",
                                       "--batch-size", "3", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["kind"] == "pipeline" and r["images"] == 6 and r["data"] == str(data_dir)
    assert r["first_epoch_ratio"] > 0 and r["cache"]["mode"] == "auto"
    # --resample-processes defaults to auto: threads below 8 cores, else a worker per core but one.
    assert r["resample_processes_setting"] == "auto"
    assert r["resample_processes"] == (r["usable_cores"] - 1 if r["usable_cores"] >= 8 else 0)


def test_cli_bench_bad_input_is_a_clear_error(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["bench", "pipeline", "--data", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "not found" in missing.output and "Traceback" not in missing.output
    scale = runner.invoke(main, ["bench", "pipeline", "--decode-scale", "0.5"])
    assert scale.exit_code == 1 and "--decode-scale" in scale.output
    procs = runner.invoke(main, ["bench", "pipeline", "--resample-processes", "-1"])
    assert procs.exit_code == 1 and "--resample-processes '-1': use auto, 0 (threads)" in procs.output
    small = runner.invoke(main, ["bench", "model", "--backbone", "vgg16", "--image-size", "16"])
    assert small.exit_code == 1 and "vgg16 needs at least 32 px" in small.output
    freeze = runner.invoke(main, ["bench", "model", "--freeze", "some"])
    assert freeze.exit_code == 1 and "model.freeze" in freeze.output


def test_cli_bench_names_every_unusable_file_before_timing(tmp_path, monkeypatch):
    # A file TensorFlow cannot decode used to stop the pass with an InvalidArgumentError (pipeline)
    # or a long nested traceback (fit) that named no file: now every file is checked first.
    data_dir = tmp_path / "bad"
    folder = data_dir / "train" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(folder / f"ok{i}.jpg")
    (folder / "x.jpg").write_text("notjpeg\n")
    (folder / "trunc.jpg").write_bytes((folder / "ok0.jpg").read_bytes()[:200])
    timed = []
    monkeypatch.setattr(bench, "bench_pipeline", lambda *a, **k: timed.append("pipeline"))
    monkeypatch.setattr(bench, "bench_fit", lambda *a, **k: timed.append("fit"))
    runner = CliRunner()
    for kind in ("pipeline", "fit"):
        result = runner.invoke(main, ["bench", kind, "--backbone", "resnet18", "--data", str(data_dir),
                                      "--image-size", "32", "--batch-size", "2", "--steps", "1",
                                      "--repeats", "1", "--json"])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
        assert "Error: 2 files under" in result.output
        assert os.path.join("train", "a", "x.jpg") + ": not a JPEG/PNG/BMP/GIF image (it is text)" in result.output
        assert os.path.join("train", "a", "trunc.jpg") + ": cannot be decoded as JPEG, truncated or corrupt" in result.output
        assert "Checked 6 files in" in result.output and "4 usable, 2 unusable" in result.output
    assert timed == []  # stopped before anything was timed


def test_reference_script_says_what_it_needs():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_reference.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "torchvision" in proc.stdout
    try:
        import torchvision  # noqa: F401
    except Exception:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_reference.py"), "--images", "2"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "needs torch and torchvision" in proc.stderr
