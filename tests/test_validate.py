"""Validation: one test per kind of bad file; each error names the file."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from cloudseg.data.io import read_chip, read_label, write_tif
from cloudseg.data.validate import DatasetError, validate_split


def _problems(root, split="train", deep=True):
    with pytest.raises(DatasetError) as info:
        validate_split(root, split, deep=deep)
    return info.value.problems, str(info.value)


@pytest.fixture(params=[True, False], ids=["deep", "headers"])
def deep(request, tmp_path, monkeypatch):
    """Both ways of validating: every pixel, or headers and last pixels (cached, here in a fresh folder)."""
    monkeypatch.setenv("CLOUDSEG_CACHE", str(tmp_path / "cache"))
    return request.param


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


def test_missing_band(tiny_copy, deep):
    (tiny_copy / "train_features" / "tr01" / "B08.tif").unlink()
    problems, msg = _problems(tiny_copy, deep=deep)
    assert problems == [f"{tiny_copy / 'train_features' / 'tr01' / 'B08.tif'}: file is missing"]
    assert "B08.tif" in msg and "1 problem" in msg


def test_truncated_tif(tiny_copy, deep):
    path = tiny_copy / "train_features" / "tr00" / "B03.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    problems, _ = _problems(tiny_copy, deep=deep)
    assert len(problems) == 1 and str(path) in problems[0] and "unreadable or truncated" in problems[0]


def test_garbage_file_is_unreadable(tiny_copy, deep):
    path = tiny_copy / "train_features" / "tr02" / "B02.tif"
    path.write_bytes(b"this is not a tiff")
    problems, _ = _problems(tiny_copy, deep=deep)
    assert len(problems) == 1 and str(path) in problems[0] and "unreadable" in problems[0]


def test_wrong_shape(tiny_copy, deep):
    path = tiny_copy / "train_features" / "tr00" / "B04.tif"
    write_tif(path, np.zeros((511, 512), dtype=np.uint16))
    problems, _ = _problems(tiny_copy, deep=deep)
    assert problems == [f"{path}: wrong shape 511x512, expected 512x512"]


def test_wrong_dtype(tiny_copy, deep):
    path = tiny_copy / "train_features" / "tr03" / "B02.tif"
    write_tif(path, np.zeros((512, 512), dtype=np.float32))
    problems, _ = _problems(tiny_copy, deep=deep)
    assert problems == [f"{path}: wrong dtype float32, expected uint16"]


def test_non_binary_label(tiny_copy):
    path = tiny_copy / "train_labels" / "tr01.tif"
    lab = np.zeros((512, 512), dtype=np.uint8)
    lab[0, :3] = [1, 2, 255]
    write_tif(path, lab)
    problems, _ = _problems(tiny_copy)
    assert problems == [f"{path}: label is not binary, found values [2, 255] besides 0/1"]


def test_missing_label(tiny_copy, deep):
    path = tiny_copy / "train_labels" / "tr02.tif"
    path.unlink()
    problems, _ = _problems(tiny_copy, deep=deep)
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


def test_header_check_is_cached_by_the_files(tiny_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDSEG_CACHE", str(tmp_path / "cache"))
    assert len(validate_split(tiny_copy, "train", deep=False).ids) == 4
    assert len(list((tmp_path / "cache" / "validated").glob("*.json"))) == 1
    path = tiny_copy / "train_features" / "tr01" / "B02.tif"
    path.write_bytes(b"not a tif")  # another size and time: checked again, and the problem is found
    with pytest.raises(DatasetError, match="unreadable"):
        validate_split(tiny_copy, "train", deep=False)


def test_header_only_metadata_is_an_empty_split(tmp_path):
    root = tmp_path / "d"
    (root / "train_features").mkdir(parents=True)
    (root / "train_labels").mkdir()
    (root / "train_metadata.csv").write_text("chip_id,location,datetime,cloudpath\n")
    problems, _ = _problems(root)
    assert problems == [f"{root / 'train_metadata.csv'}: no chips (the metadata has a header and no rows)"]


@pytest.mark.parametrize("content, message", [(b"", "metadata file is empty"),
                                              (b"chip_id,location\n\xff\xfe,x\n", "not UTF-8 text")])
def test_unreadable_metadata_names_the_file(tmp_path, content, message):
    root = tmp_path / "d"
    (root / "train_features").mkdir(parents=True)
    (root / "train_metadata.csv").write_bytes(content)
    problems, _ = _problems(root)
    assert len(problems) == 1 and problems[0].startswith(str(root / "train_metadata.csv")) and message in problems[0]


def test_lazy_split_reads_what_memory_holds(tiny_data):
    from cloudseg.data.dataset import ChipDataset

    lazy = validate_split(tiny_data, "train", deep=False)
    held = validate_split(tiny_data, "train", load=True)
    assert not lazy.in_memory and held.in_memory
    a, b = ChipDataset(lazy)[2], ChipDataset(held)[2]
    assert a["chip_id"] == b["chip_id"]
    assert torch_equal(a["image"], b["image"]) and torch_equal(a["mask"], b["mask"])


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))
