"""Validation: one test per kind of bad file; each error names the file."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from cloudseg.data.io import read_chip, read_label, write_tif
from cloudseg.data.validate import DatasetError, validate_split


def _problems(root, split="train"):
    with pytest.raises(DatasetError) as info:
        validate_split(root, split)
    return info.value.problems, str(info.value)


def test_valid_split_loads_arrays(tiny_data):
    result = validate_split(tiny_data, "train", load=True)
    assert result.ids == [f"tr{i:02d}" for i in range(6)]
    assert result.has_labels
    chip = result.images["tr00"]
    assert chip.shape == (4, 512, 512) and chip.dtype == np.uint16
    np.testing.assert_array_equal(chip, read_chip(tiny_data / "train_features" / "tr00"))
    lab = result.masks["tr00"]
    assert lab.shape == (512, 512) and lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, read_label(tiny_data / "train_labels" / "tr00.tif"))
    assert list(result.metadata.index) == result.ids


def test_missing_band(tiny_copy):
    (tiny_copy / "train_features" / "tr01" / "B08.tif").unlink()
    problems, msg = _problems(tiny_copy)
    assert problems == [f"{tiny_copy / 'train_features' / 'tr01' / 'B08.tif'}: file is missing"]
    assert "B08.tif" in msg and "1 problem" in msg


def test_truncated_tif(tiny_copy):
    path = tiny_copy / "train_features" / "tr00" / "B03.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    problems, _ = _problems(tiny_copy)
    assert len(problems) == 1 and str(path) in problems[0] and "unreadable or truncated" in problems[0]


def test_garbage_file_is_unreadable(tiny_copy):
    path = tiny_copy / "train_features" / "tr02" / "B02.tif"
    path.write_bytes(b"this is not a tiff")
    problems, _ = _problems(tiny_copy)
    assert len(problems) == 1 and str(path) in problems[0] and "unreadable" in problems[0]


def test_wrong_shape(tiny_copy):
    path = tiny_copy / "train_features" / "tr00" / "B04.tif"
    write_tif(path, np.zeros((511, 512), dtype=np.uint16))
    problems, _ = _problems(tiny_copy)
    assert problems == [f"{path}: wrong shape 511x512, expected 512x512"]


def test_wrong_dtype(tiny_copy):
    path = tiny_copy / "train_features" / "tr03" / "B02.tif"
    write_tif(path, np.zeros((512, 512), dtype=np.float32))
    problems, _ = _problems(tiny_copy)
    assert problems == [f"{path}: wrong dtype float32, expected uint16"]


def test_non_binary_label(tiny_copy):
    path = tiny_copy / "train_labels" / "tr01.tif"
    lab = np.zeros((512, 512), dtype=np.uint8)
    lab[0, :3] = [1, 2, 255]
    write_tif(path, lab)
    problems, _ = _problems(tiny_copy)
    assert problems == [f"{path}: label is not binary, found values [2, 255] besides 0/1"]


def test_missing_label(tiny_copy):
    path = tiny_copy / "train_labels" / "tr02.tif"
    path.unlink()
    problems, _ = _problems(tiny_copy)
    assert problems == [f"{path}: label file is missing"]


def test_metadata_row_without_folder(tiny_copy):
    shutil.rmtree(tiny_copy / "train_features" / "tr03")
    problems, _ = _problems(tiny_copy)
    assert f"{tiny_copy / 'train_features' / 'tr03'}: metadata row without a chip folder" in problems


def test_folder_without_metadata_row(tiny_copy):
    shutil.copytree(tiny_copy / "train_features" / "tr00", tiny_copy / "train_features" / "zzzz")
    problems, _ = _problems(tiny_copy)
    assert problems == [f"{tiny_copy / 'train_features' / 'zzzz'}: chip folder without a metadata row"]


def test_duplicate_ids(tiny_copy):
    meta_path = tiny_copy / "train_metadata.csv"
    meta = pd.read_csv(meta_path, dtype=str)
    pd.concat([meta, meta.iloc[[1]]]).to_csv(meta_path, index=False)
    problems, _ = _problems(tiny_copy)
    assert problems == [f"{meta_path}: chip id 'tr01' appears 2 times"]


def test_hidden_folders_are_not_chips(tiny_copy):
    (tiny_copy / "train_features" / ".ipynb_checkpoints").mkdir()
    (tiny_copy / "train_features" / ".DS_Store").write_bytes(b"\0")
    assert len(validate_split(tiny_copy, "train").ids) == 4


def test_every_problem_reported_at_once(tiny_copy):
    (tiny_copy / "train_features" / "tr00" / "B02.tif").unlink()
    (tiny_copy / "train_labels" / "tr01.tif").unlink()
    write_tif(tiny_copy / "train_features" / "tr02" / "B08.tif", np.zeros((5, 5), dtype=np.uint16))
    problems, msg = _problems(tiny_copy)
    assert len(problems) == 3
    assert "3 problem(s)" in msg


def test_unlabeled_split_validates(tmp_path):
    from tests.data.fixtures import make_dataset

    root = make_dataset(tmp_path, n_chips=2, split="test", labels=False)
    result = validate_split(root, "test")
    assert not result.has_labels and result.ids == ["te00", "te01"]
    with pytest.raises(DatasetError, match="labels folder is missing"):
        validate_split(root, "test", labels=True)


def test_missing_metadata_names_file(tmp_path):
    (tmp_path / "train_features").mkdir()
    problems, _ = _problems(tmp_path)
    assert problems == [f"{tmp_path / 'train_metadata.csv'}: metadata file is missing"]


def test_real_sample_validates(real_data):
    train = validate_split(real_data, "train")
    assert len(train.ids) == 32 and train.has_labels
    assert train.metadata["location"].nunique() == 6
    test = validate_split(real_data, "test")
    assert test.ids == ["akny"] and not test.has_labels
