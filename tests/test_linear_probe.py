"""Linear probing of an AR model's features (`vqar eval linear-probe`): the probe's accuracy against one written
out here, and the refusals of data it cannot probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_tokenizer
from vqar.cli import main


def test_linear_probe_on_a_trained_model(tiny_pipeline, tmp_path):
    from conftest import TINY_AR
    from vqar.eval.probe import block_features, linear_probe
    from vqar.train.ar import train_ar
    from vqar.train.ar_config import load_run_config

    run = tmp_path / "ar"
    train_ar(load_run_config("rq-mnist", [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=10"]), run)
    from vqar.bundle import load

    model = load(run)
    result = linear_probe(model, "mnist", layer=1, max_images=300)
    assert result["test_images"] == 30 and result["feature_dim"] == model.cfg.dim and result["pixel_dim"] == 16

    # The probe written out here: block 1's output for the null class (never the label), averaged over the image
    # tokens after the class token; a scaled logistic regression fit on the training split, scored on the other.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vqar.data import DataConfig, build_datasets

    def probe(train_x, train_y, test_x, test_y):
        scaler = StandardScaler().fit(train_x)
        fitted = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_x), train_y)
        return float((fitted.predict(scaler.transform(test_x)) == test_y).mean())

    outputs = []
    hook = model.layers[1].register_forward_hook(lambda module, args, out: outputs.append(out[:, 1:].float().mean(1)))
    arrays = []
    for split in build_datasets(DataConfig(source="mnist", image_size=32, channels=1, max_images=300)):
        images = torch.stack([split[i].image for i in range(len(split))])
        labels = np.array([split[i].label for i in range(len(split))])
        outputs.clear()
        with torch.no_grad():
            for chunk in images.split(128):
                model(model.tokenizer.encode(chunk), None)  # None: the null class, never the labels
        pixels = torch.nn.functional.avg_pool2d(images, 8).flatten(1)  # 32x32 -> the 4x4 code grid
        arrays.append((torch.cat(outputs).numpy(), pixels.numpy(), labels))
    (train_f, train_p, train_y), (test_f, test_p, test_y) = arrays
    with torch.no_grad():  # the features themselves too, not only the accuracy they give
        codes = model.tokenizer.encode(images[:8])
        outputs.clear()
        model(codes, None)
    hook.remove()
    assert torch.equal(block_features(model, codes, 1), outputs[0])
    assert len(test_y) == 30 and len(train_y) == result["train_images"]
    assert result["accuracy"] == probe(train_f, train_y, test_f, test_y)
    assert result["pixel_baseline_accuracy"] == probe(train_p, train_y, test_p, test_y)
    with pytest.raises(ValueError, match="layer must be in"):
        block_features(model, torch.zeros(1, *model.code_shape, dtype=torch.long), 99)


def test_linear_probe_refuses_too_few_images_before_encoding_any(tmp_path, monkeypatch, capsys):
    """On 3 digits the probe reported accuracy 0.0 (one held-out image), on 1 a traceback (none held out)."""
    import vqar
    import vqar.eval.probe as probe
    from vqar.ar import GPT, GPTConfig
    from vqar.data.datasets import ArrayDataset, DatasetSplit

    model = GPT(GPTConfig(vocab_size=16, code_shape=[4, 4], dim=16, n_layer=2, n_head=2, num_classes=0))
    vqar.save_pretrained(model.attach(random_tokenizer()), tmp_path / "gpt")
    real_features = probe.block_features
    monkeypatch.setattr(probe, "block_features", lambda *a, **k: pytest.fail("images were encoded first"))
    # the classes counted are those of the digits read: 3 spread digits are a 0, a 3 and a 6
    for images, held_out, classes in ((3, 1, 3), (1, 0, 1), (90, 9, 10)):
        args = ["eval", "linear-probe", "mnist", "--model", str(tmp_path / "gpt"), "--layer", "0", "--max-images",
                str(images)]  # fmt: skip
        assert main(args) == 2, images
        err = capsys.readouterr().err
        if classes == 1:
            expected = "got 1 image of 1 class; it needs images of at least 2 classes"
        else:
            expected = (f"got {images} images ({held_out} held out): {classes} classes need at least {classes} "
                        f"held-out images, one per class, so about {classes * 10} images")  # fmt: skip
        assert expected in err and err.count("\n") == 1, err
    one_class = tmp_path / "one_class" / "cats"
    one_class.mkdir(parents=True)
    for i in range(5):
        Image.new("L", (16, 16), 40 * i).save(one_class / f"{i}.png")
    with pytest.raises(ValueError, match="got 5 images of 1 class; it needs images of at least 2 classes"):
        probe.linear_probe(vqar.load_pretrained(tmp_path / "gpt"), str(one_class.parent), 0)
    digits = ArrayDataset(np.zeros((4, 16, 16), np.uint8), [1, 1, 1, 0], 16, 1)
    with pytest.raises(ValueError, match="training split of 2 images, all of class 1"):
        probe.check_enough_images(DatasetSplit(digits, [0, 1]), DatasetSplit(digits, [2, 3]), 0.5)
    monkeypatch.setattr(probe, "block_features", real_features)
    assert main([*args[:-1], "100", "--json"]) == 0  # one held-out image per class: measured
    result = json.loads(capsys.readouterr().out)
    assert (result["train_images"], result["test_images"]) == (90, 10)


def test_a_layer_out_of_range_is_refused_before_the_data_is_opened(tmp_path, monkeypatch, capsys):
    import vqar.eval.probe as probe

    _save_tiny_gpt(tmp_path / "gpt")  # 2 blocks
    monkeypatch.setattr(probe, "open_dataset", lambda cfg: pytest.fail("the data was opened first"))
    args = ["eval", "linear-probe", "mnist", "--model", str(tmp_path / "gpt"), "--layer", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "layer must be in [0, 2) for this model (its blocks are 0..1), got 2" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_probe_takes_a_device_and_names_one_it_cannot_use_before_loading(tmp_path, monkeypatch, capsys):
    """`--device` was missing: the probe's feature passes ran on the CPU whatever the machine had."""
    import vqar.interop

    _save_tiny_gpt(tmp_path / "gpt")
    args = ["eval", "linear-probe", "mnist", "--model", str(tmp_path / "gpt"), "--layer", "0", "--max-images", "100",
            "--json"]  # fmt: skip
    assert main([*args, "--device", "cpu"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    assert on_cpu["test_images"] == 10 and 0 <= on_cpu["accuracy"] <= 1
    monkeypatch.setattr(vqar.interop, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded first"))
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "vqar: error: device 'cuda' was asked for but CUDA is not available on this machine\n"


def _save_tiny_gpt(folder) -> None:
    """An untrained unconditional GPT over the 4x4 codes of the untrained 16 px tokenizer."""
    import vqar
    from vqar.ar import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, code_shape=[4, 4], dim=16, n_layer=2, n_head=2, num_classes=0))
    vqar.save_pretrained(model.attach(random_tokenizer()), folder)


def _labelled_by_brightness(labels: list[int], seed: int = 0) -> np.ndarray:
    """16 px grey images whose brightness tells the class (so raw pixels probe perfectly), a little noise added."""
    rng = np.random.default_rng(seed)
    levels = {label: 30 + 190 * i / max(len(set(labels)) - 1, 1) for i, label in enumerate(sorted(set(labels)))}
    base = np.array([levels[label] for label in labels])[:, None, None]
    return np.clip(base + rng.normal(0, 5, (len(labels), 16, 16)), 0, 255).astype(np.uint8)


def test_linear_probe_counts_the_classes_present_not_the_label_range(tmp_path, capsys):
    """Labels {3, 7} were 8 classes and {0, 5, 9} 10: 40 images (4 held out) were refused as too few for them."""
    _save_tiny_gpt(tmp_path / "gpt")
    for present in ([3, 7], [0, 5, 9]):
        labels = [present[i % len(present)] for i in range(40)]
        data = tmp_path / f"digits{''.join(map(str, present))}.npz"
        np.savez(data, images=_labelled_by_brightness(labels), labels=np.array(labels))
        args = ["eval", "linear-probe", str(data), "--model", str(tmp_path / "gpt"), "--layer", "0", "--json"]
        assert main(args) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out)
        assert (result["train_images"], result["test_images"], result["classes"]) == (36, 4, len(present))
        assert result["pixel_baseline_accuracy"] == 1.0  # the labels predicted are the labels given, 3 and 7
        # the chance level: the training split's most common class answered for every held-out image
        from vqar.data import DataConfig, build_datasets

        train, test = build_datasets(DataConfig(source=str(data), image_size=16, channels=1))
        train_y = [train[i].label for i in range(len(train))]
        test_y = np.array([test[i].label for i in range(len(test))])
        most_common = max(present, key=lambda label: (train_y.count(label), -label))
        assert result["chance_accuracy"] == float((test_y == most_common).mean())
    assert main([*args[:-1], "--max-images", "10"]) == 2
    err = capsys.readouterr().err
    assert "got 10 images (1 held out): 3 classes need at least 3 held-out images" in err and "about 30 images" in err


def test_linear_probe_on_tar_shards(tmp_path, capsys):
    """`--data` at tar shards was a TypeError traceback ('ShardDataset' object is not subscriptable)."""
    import io
    import tarfile

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    import vqar
    from vqar.data import DataConfig, open_dataset
    from vqar.data.transforms import fit_image, to_tensor
    from vqar.eval.probe import block_features

    _save_tiny_gpt(tmp_path / "gpt")
    args = ["pack-shards", "mnist", "--out", str(tmp_path / "shards"), "--max-images", "300", "--shard-size", "50"]
    assert main(args) == 0
    capsys.readouterr()
    index = tmp_path / "shards" / "shards.json"
    probe_args = ["eval", "linear-probe", str(index), "--model", str(tmp_path / "gpt"), "--layer", "1", "--json"]
    assert main(probe_args) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["train_images"], result["test_images"], result["classes"]) == (250, 50, 10)

    # The same probe written out here on the shards' members read with tarfile: the held-out split is whole shards
    # (one of the six), each read in member order.
    cfg = DataConfig(source=str(index), image_size=16, channels=1)
    train, test = open_dataset(cfg).split(cfg.val_fraction, cfg.split_seed)
    model = vqar.load_pretrained(tmp_path / "gpt")

    def read(split):
        images, labels = [], []
        for shard in split.shards:
            with tarfile.open(shard.url) as tar:
                for member in tar.getmembers():
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".png"):
                        images.append(to_tensor(fit_image(Image.open(io.BytesIO(data)).convert("L"), 16)))
                    else:
                        labels.append(int(data.decode()))
        images = torch.stack(images)
        features = torch.cat([block_features(model, model.tokenizer.encode(chunk), 1) for chunk in images.split(128)])
        pixels = torch.nn.functional.avg_pool2d(images, 4).flatten(1)  # 16x16 -> the 4x4 code grid
        return features.numpy(), pixels.numpy(), np.array(labels)

    def probe(train_x, train_y, test_x, test_y):
        scaler = StandardScaler().fit(train_x)
        fitted = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_x), train_y)
        return float((fitted.predict(scaler.transform(test_x)) == test_y).mean())

    (train_f, train_p, train_y), (test_f, test_p, test_y) = read(train), read(test)
    assert len(test_y) == 50 and len(np.unique(test_y)) > 1
    assert result["accuracy"] == probe(train_f, train_y, test_f, test_y)
    assert result["pixel_baseline_accuracy"] == probe(train_p, train_y, test_p, test_y)
    values, counts = np.unique(train_y, return_counts=True)
    assert result["chance_accuracy"] == float((test_y == values[counts.argmax()]).mean())
    assert main([*probe_args[:2], str(tmp_path / "shards" / "shard-000000.tar"), *probe_args[3:]]) == 2
    err = capsys.readouterr().err
    assert "is a single shard: pack more shards (vqar pack-shards --shard-size)" in err and err.count("\n") == 1


def test_linear_probe_skips_unreadable_images_of_a_folder(tmp_path, capsys, caplog):
    """One unreadable file in an image folder was an AttributeError traceback ('BadSample' object has no attribute
    'image')."""
    _save_tiny_gpt(tmp_path / "gpt")
    labels = [i % 2 for i in range(40)]
    for i, (image, label) in enumerate(zip(_labelled_by_brightness(labels), labels, strict=True)):
        (tmp_path / "data" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "data" / f"class{label}" / f"{i:02d}.png")
    junk = tmp_path / "data" / "class1" / "junk.png"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    args = ["eval", "linear-probe", str(tmp_path / "data"), "--model", str(tmp_path / "gpt"), "--layer", "0", "--json"]
    with caplog.at_level("WARNING", logger="vqar"):
        assert main(args) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["train_images"] + result["test_images"] == 40 and result["classes"] == 2
    warnings = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warnings) == 1 and "1 of the " in warnings[0] and f"left out (first: {junk}: " in warnings[0]

    # nothing readable at all: one line naming the source, before any image is encoded
    for path in (tmp_path / "data").rglob("*.png"):
        path.write_bytes(b"not an image")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vqar: error: no readable image in {tmp_path / 'data'}: none of the 41 files tried could "
                          "be read (first: ") and err.count("\n") == 1, err  # fmt: skip


def test_unlabelled_data_is_refused_naming_every_labelled_source_the_probe_reads(tmp_path, capsys):
    """The refusal listed only class sub-folders and mnist, although a .npz with labels and tar shards with cls
    members are probed too."""
    _save_tiny_gpt(tmp_path / "gpt")
    np.savez(tmp_path / "unlabelled.npz", images=_labelled_by_brightness([0] * 40))
    (tmp_path / "flat").mkdir()
    for i, image in enumerate(_labelled_by_brightness([0] * 40)):
        Image.fromarray(image).save(tmp_path / "flat" / f"{i}.png")
    for data in (tmp_path / "unlabelled.npz", tmp_path / "flat"):
        assert main(["eval", "linear-probe", str(data), "--model", str(tmp_path / "gpt"), "--layer", "0"]) == 2
        assert capsys.readouterr().err == (
            "vqar: error: linear probing needs labelled data; give 'mnist', a folder with one sub-folder per class, "
            "a .npz with labels (labels, y or arr_1) or tar shards with cls members\n"
        )
