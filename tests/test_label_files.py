"""Label files (issue 24.4): CSVs and COVIDx's train.txt/test.txt read into the same Manifest as a
folder tree, with patient ids; every bad line named."""

import numpy as np
import pytest
from PIL import Image

from tfcovid.data import label_files
from tfcovid.data.types import ClassCountError, DataError


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 10), dtype=np.uint8)).save(path)
    return path


def _csv(tmp_path, text, images=("a.png", "b.png", "c.png", "d.png")):
    for i, name in enumerate(images):
        _image(tmp_path / "img" / name, i)
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_csv_gives_paths_labels_patients_and_splits(tmp_path):
    path = _csv(tmp_path, "path,label,patient_id,split\nimg/a.png,covid,p1,train\nimg/b.png,normal,p2,val\n"
                          "img/c.png,normal,p3,\nimg/d.png,covid,p1,TRAIN\n")
    manifest = label_files.read(path, "binary")
    assert manifest.class_names == ("covid", "normal") and manifest.output_names == ("covid", "normal")
    assert set(manifest.splits) == {"train", "validation", label_files.UNASSIGNED}
    train = manifest.splits["train"]
    assert train.paths == (str(tmp_path / "img/a.png"), str(tmp_path / "img/d.png"))
    assert train.labels.tolist() == [0, 0] and train.folders == ("covid", "covid")
    assert manifest.splits["validation"].labels.tolist() == [1]
    assert manifest.patients[str(tmp_path / "img/c.png")] == "p3" and manifest.bad == ()


def test_one_column_per_label_gives_multi_hot_vectors(tmp_path):
    path = _csv(tmp_path, "path,covid-19,normal,pneumonia\nimg/a.png,1,0,1\nimg/b.png,0,1,0\n")
    manifest = label_files.read(path, "multilabel", ("covid-19", "normal", "pneumonia"))
    split = manifest.splits[label_files.UNASSIGNED]
    assert split.labels.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert split.folders == ("covid-19+pneumonia", "normal")
    assert manifest.output_names == ("covid-19", "normal", "pneumonia")
    assert "no patient_id column" in manifest.problems[0]  # each image its own patient, said


def test_covidx_files_read_as_published(tmp_path):
    for name, seed in (("train/x1.png", 1), ("train/x2.jpeg", 2), ("train/x3.png", 3), ("test/y1.png", 4)):
        _image(tmp_path / name, seed)
    (tmp_path / "train.txt").write_text("101 x1.png COVID-19 cohen\n101 x2.jpeg COVID-19 cohen\n"
                                        "7 x3.png normal rsna\n\n")
    (tmp_path / "test.txt").write_text("55 y1.png pneumonia rsna\n")
    manifest = label_files.read(tmp_path / "train.txt", "multilabel", ("covid-19", "normal", "pneumonia"),
                                {"covid-19": ("covid-19", "pneumonia"), "normal": ("normal",),
                                 "pneumonia": ("pneumonia",)})
    assert list(manifest.splits) == ["train", "test"]
    assert manifest.splits["train"].labels.tolist() == [[1, 0, 1], [1, 0, 1], [0, 1, 0]]
    assert manifest.splits["test"].paths == (str(tmp_path / "test/y1.png"),)
    assert manifest.patients[str(tmp_path / "train/x2.jpeg")] == "101"


def test_binary_task_with_three_classes_is_refused(tmp_path):
    path = _csv(tmp_path, "path,label\nimg/a.png,x\nimg/b.png,y\nimg/c.png,z\n")
    with pytest.raises(ClassCountError, match=r"exactly 2 classes; .*labels.csv has 3: \['x', 'y', 'z'\]"):
        label_files.read(path, "binary")  # a label file has classes, not class folders


@pytest.mark.parametrize("text, message", [
    ("file,label\nimg/a.png,x\n", r"needs a 'path' column"),
    ("path,patient_id\nimg/a.png,p1\n", r"needs a 'path' column and a 'label' column"),
    ("path,label,split\nimg/a.png,x,train\nimg/b.png,y,holdout\n", r"labels.csv line 3: unknown split 'holdout'"),
    ("path,label\nimg/a.png,x\nimg/b.png,y\nimg/a.png,x\n",
     r"labels.csv line 4: .*a.png is listed already on labels.csv line 2"),
    ("path,label\nimg/a.png,x\n../outside.png,y\n", r"labels.csv line 3: \.\./outside.png is outside"),
    ("path,label\nimg/a.png,x\n,y\n", r"labels.csv line 3: the path is empty"),
    ("path,label\nimg/a.png,\n", r"labels.csv line 2: the label is empty"),
    ("path,label\nimg/a.png,x,extra\n", r"labels.csv line 2: more fields"),
    ("path,covid-19,normal,pneumonia\nimg/a.png,1,0,yes\n", r"line 2: column 'pneumonia' is 'yes'; use 0 or 1"),
    ("path,covid-19,normal\nimg/a.png,1,0\n", r"not for \['pneumonia'\]"),
    ("path,label\n", r"lists no images"),
])
def test_bad_csv_lines_are_named(tmp_path, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError, match=message):
        label_files.read(path, "multilabel" if "covid-19" in text else "binary", ("covid-19", "normal", "pneumonia"))


def test_unknown_label_of_the_three_label_task_names_its_line(tmp_path):
    path = _csv(tmp_path, "path,label\nimg/a.png,normal\nimg/b.png,tb\n")
    with pytest.raises(DataError, match=r"'tb' \(labels.csv line 3\)"):
        label_files.read(path, "multilabel", ("normal",), {"normal": ("normal",)})


def test_missing_and_unusable_files_are_listed_with_their_line(tmp_path):
    path = _csv(tmp_path, "path,label\nimg/a.png,x\nimg/gone.png,y\nimg/b.png,y\nimg/notes.txt,x\n")
    (tmp_path / "img" / "notes.txt").write_text("hello")
    manifest = label_files.read(path, "binary")
    reasons = {b.path.rsplit("/", 1)[1]: b.reason for b in manifest.bad}
    assert reasons["gone.png"] == "file not found (listed on labels.csv line 3)"
    assert reasons["notes.txt"].endswith("(listed on labels.csv line 5)")
    assert len(manifest.splits[label_files.UNASSIGNED]) == 2  # only the usable ones


def test_covidx_line_with_the_wrong_field_count_is_named(tmp_path):
    (tmp_path / "train.txt").write_text("1 a.png normal rsna\n2 b.png\n")
    with pytest.raises(DataError, match=r"train.txt line 2: 2 fields"):
        label_files.read(tmp_path / "train.txt")


def test_missing_label_file_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match=r"Label file not found: .*nothing.csv"):
        label_files.read(tmp_path / "nothing.csv")
