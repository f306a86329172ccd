"""Evaluation of models: a tokenizer's reconstruction metrics (`eval rfid`) and the image sizes it refuses,
rejection sampling, the sampling throughput benchmark (`vqar bench sample`) and the digit classifier's domain FID."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_tokenizer
from vqar.cli import main


def test_rfid_reports_reconstruction_metrics(tiny_pipeline, tmp_path):
    from vqar.bundle import load
    from vqar.data.mnist import load_mnist_digits
    from vqar.eval.rfid import evaluate_tokenizer

    tokenizer = load(tiny_pipeline / "tokenizer")
    result = evaluate_tokenizer(tokenizer, "mnist", None, max_images=40, batch_size=16)
    assert result["images"] == 40 and len(result["codebook_usage_percent"]) == tokenizer.depth
    assert 0 < result["ssim"] < 1
    # The known answers, computed here from the 40 digits spread over the set (as --max-images takes them) in the
    # same batches of 16: PSNR of the uint8 reconstructions, and per depth the share of the 64 codes used and
    # exp(entropy) of the code histogram.
    from vqar.data.datasets import spread_indices

    digits = load_mnist_digits()[0]
    digits = digits[spread_indices(len(digits), 40)]
    codes, psnr = [], []
    with torch.no_grad():
        for chunk in np.split(digits, [16, 32]):
            x = torch.from_numpy(chunk[:, None].astype(np.float32)) / 127.5 - 1
            codes.append(tokenizer.encode(x))
            recon = (tokenizer.decode(codes[-1]).clamp(-1, 1) * 127.5 + 127.5).round()
            mse = ((recon[:, 0].numpy().astype(np.float64) - chunk) / 255) ** 2
            psnr.extend(10 * np.log10(1 / mse.reshape(len(chunk), -1).mean(1)))
    codes = torch.cat(codes).numpy()
    assert result["psnr_db"] == pytest.approx(np.mean(psnr), rel=1e-5)
    for d in range(tokenizer.depth):
        counts = np.bincount(codes[..., d].ravel(), minlength=64)
        p = counts[counts > 0] / counts.sum()
        assert result["codebook_usage_percent"][d] == pytest.approx(100 * len(p) / 64, rel=1e-6)
        assert result["perplexity"][d] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_rfid_of_a_var_tokenizer_reports_each_scale(tmp_path):
    """A VAR tokenizer's usage and perplexity were one figure pooled over its scales (86%, where the scales used
    0.4, 10, 29 and 85%): the coarse scales' collapse, which training reports per scale, did not show."""
    from vqar.eval.rfid import evaluate_tokenizer
    from vqar.quantize import QuantizerConfig
    from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig

    conv = ConvConfig(in_channels=1, out_channels=1, resolution=16, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1,
                      attn_resolutions=[], z_channels=8, norm_groups=8)  # fmt: skip
    quantizer = QuantizerConfig(kind="multiscale", codebook_size=16, dim=4, patch_nums=[1, 2, 4], ema=False)
    tokenizer = Tokenizer(TokenizerConfig(conv=conv, quantizer=quantizer, quant_conv_kernel=3)).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", arr_0=images)
    result = evaluate_tokenizer(tokenizer, tmp_path / "set.npz", None, batch_size=4)
    with torch.no_grad():
        codes = tokenizer.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert len(result["codebook_usage_percent"]) == len(result["perplexity"]) == 3
    for k, (begin, end) in enumerate([(0, 1), (1, 5), (5, 21)]):
        used = len(np.unique(codes[:, begin:end].numpy()))
        assert result["codebook_usage_percent"][k] == pytest.approx(100 * used / 16), k
    assert result["codebook_usage_percent"][0] <= 100 * 6 / 16  # 6 codes at most at the 1x1 scale


def test_rfid_turns_colour_grey_as_training_does(tmp_path):
    """A grey tokenizer's rFID took the plain mean of the three channels, which gives pure red, green and blue one
    grey (85), where training and `vqar reconstruct` use Pillow's luma (76, 150, 29): other codes, other PSNRs."""
    from PIL import Image

    from vqar.eval.rfid import evaluate_tokenizer

    tokenizer = random_tokenizer()  # 1 channel, 16 px
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 120, 40)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
    result = evaluate_tokenizer(tokenizer, tmp_path, None, batch_size=4)
    grey = np.stack([np.asarray(Image.new("RGB", (16, 16), colour).convert("L")) for colour in colours])
    assert grey[:3, 0, 0].tolist() == [76, 150, 29]
    with torch.no_grad():
        recon = tokenizer.decode(tokenizer.encode(torch.from_numpy(grey[:, None]).float() / 127.5 - 1))
    recon = (recon[:, 0].clamp(-1, 1) * 127.5 + 127.5).round().numpy()
    mse = (((recon - grey) / 255) ** 2).reshape(len(grey), -1).mean(1)
    assert result["psnr_db"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)


def test_the_table_rounds_figures_per_depth_as_single_ones(capsys):
    """Perplexity per depth was printed with float32's noise digits (10.04092025756836) beside 4-decimal figures."""
    from vqar.commands.evaluate import _print

    _print({"psnr_db": 25.123456, "perplexity": [10.04092025756836, 3.5], "images": 40, "depths": [1, 2]}, False)
    assert capsys.readouterr().out.splitlines() == [
        f"{'psnr_db':>28}: 25.1235", f"{'perplexity':>28}: [10.0409, 3.5000]", f"{'images':>28}: 40",
        f"{'depths':>28}: [1, 2]"]  # fmt: skip


def test_rfid_refuses_image_sizes_it_cannot_use_before_reading_any_image(tmp_path, monkeypatch, capsys, caplog):
    """--image-size 100000 went on to resize every image to 100000x100000 (a MemoryError traceback, or the OOM
    killer); sizes the tokenizer cannot encode failed only after the whole set was read."""
    import vqar
    import vqar.eval.rfid as rfid
    import vqar.utils.memory

    vqar.save_pretrained(random_tokenizer(), tmp_path / "conv")
    vqar.save_pretrained(random_tokenizer(quantizer="multiscale"), tmp_path / "var")
    vqar.save_pretrained(random_tokenizer(arch="vit"), tmp_path / "vit")
    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 2 << 30)  # the same answer on any machine
    real_read = rfid.read_share
    monkeypatch.setattr(rfid, "read_share", lambda *a, **k: pytest.fail("the images were read first"))
    refused = [
        ("conv", "100000", "--image-size 100000: 3 images of 100000x100000"),
        ("conv", "8192", "would need about 3.2 GB of memory, and 2.0 GB is available"),
        ("conv", "18", "--image-size 18 is not a positive multiple of the tokenizer's downsampling factor 4"),
        ("conv", "8", "--image-size 8: SSIM needs images of at least 11x11 pixels"),  # was said once all were read
        ("var", "32", "a multi-scale (VAR) tokenizer encodes images of its own size only (16)"),
        ("vit", "32", "a ViT tokenizer encodes images of its own size only (16)"),
        ("vit", "8", "a ViT tokenizer encodes images of its own size only (16)"),
    ]
    for folder, size, message in refused:
        args = ["eval", "rfid", "mnist", "--tokenizer", str(tmp_path / folder), "--image-size", size, "--no-fid",
                "--max-images", "3"]  # fmt: skip
        assert main(args) == 2, (folder, size)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (folder, size, err)
    with pytest.raises(ValueError, match="--image-size 0 is not a positive multiple"):
        rfid.evaluate_tokenizer(random_tokenizer(), "mnist", None, image_size=0)
    # Legal sizes still run: another multiple of the downsampling factor, with a warning when it is far off.
    monkeypatch.setattr(rfid, "read_share", real_read)
    for size, warned in (("32", False), ("80", True)):
        caplog.clear()
        assert main(["eval", "rfid", "mnist", "--tokenizer", str(tmp_path / "conv"), "--image-size", size,
                     "--no-fid", "--max-images", "3", "--json"]) == 0  # fmt: skip
        assert json.loads(capsys.readouterr().out)["image_size"] == int(size)
        assert ("far from the 16 px this tokenizer was built for" in caplog.text) == warned, size


def test_a_var_tokenizer_at_another_size_is_named_by_reconstruct_and_extract_codes(tmp_path, capsys):
    """Both said "expected channels-last latents (B, 4, 4, 32) ..., got shape (1, 8, 8, 32)", extract-codes after
    it had started; eval rfid already named the size."""
    from PIL import Image

    import vqar
    from conftest import random_tokenizer

    vqar.save_pretrained(random_tokenizer(quantizer="multiscale"), tmp_path / "var")
    Image.new("L", (32, 32)).save(tmp_path / "x.png")
    message = "a multi-scale (VAR) tokenizer encodes images of its own size only (16)"
    commands = [["reconstruct", "--tokenizer", str(tmp_path / "var"), str(tmp_path / "x.png"), "--size", "32",
                 "--out", str(tmp_path / "r")],
                ["extract-codes", "--tokenizer", str(tmp_path / "var"), "--data", "mnist", "--image-size", "32",
                 "--out", str(tmp_path / "c")]]  # fmt: skip
    for command, option in zip(commands, ("--size 32", "--image-size 32"), strict=True):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == f"vqar: error: {option}: {message}\n", err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_rejection_sampling_keeps_the_best_scored_samples(tiny_pipeline):
    """Against the same draws made directly and scored here by hand: per class exactly n images are kept, every
    kept one scores at least as high as every rejected one of its class, and the number drawn per class is
    n / rate rounded up (7.5 -> 8), also where floating point puts the quotient just above an integer
    (21 / 0.7 = 30.000000000000004 -> 30, not 31)."""
    from vqar.ar import RQTransformer, RQTransformerConfig
    from vqar.bundle import load
    from vqar.eval.rejection import rejection_sample
    from vqar.sampling import SamplingSettings, draw, make_conditions

    tokenizer = load(tiny_pipeline / "tokenizer")
    books = tokenizer.code_vectors()
    cfg = RQTransformerConfig(vocab_size=tokenizer.codebook_size, code_shape=list(tokenizer.code_shape()),
                              code_dim=books.shape[-1], dim=32, n_head=2, n_layer=1, n_depth_layer=1,
                              num_classes=3)  # fmt: skip
    model = RQTransformer(cfg, code_embeddings=books).eval().attach(tokenizer)

    def brightness_classifier(images):  # class 0 prefers dark images, class 2 bright ones
        mean = images.mean((1, 2, 3))
        return torch.stack([-10 * mean, torch.zeros_like(mean), 10 * mean], dim=1)

    def log_score(images, label):  # log p(label | image) of that classifier, by hand, in float64
        m = images.detach().double().mean((1, 2, 3))
        return torch.log_softmax(torch.stack([-10 * m, 0 * m, 10 * m], dim=1), dim=1)[:, label]

    settings = SamplingSettings(seed=4)
    for classes, n, rate, drawn_per_class in (([0, 2], 3, 0.25, 12), ([0, 2], 3, 0.4, 8), ([1], 21, 0.7, 30)):
        result, report = rejection_sample(model, classes, n, rate, brightness_classifier, settings)
        everything = draw(model, make_conditions(model, classes=classes, n_per_condition=drawn_per_class), settings)
        assert report["drawn"] == len(everything.images) == drawn_per_class * len(classes)
        assert report["kept"] == n * len(classes) and report["accept_rate"] == pytest.approx(n / drawn_per_class)
        assert torch.equal(result.images, everything.images[result.index])  # the kept ones are drawn ones
        assert result.labels.tolist() == [c for c in classes for _ in range(n)]
        # compared as log-probabilities: those of the unlikely classes (about 1e-7 here) still differ by far more
        # than float rounding, so the order is checked for every class
        logs = torch.cat([log_score(everything.images[everything.labels == c], c) for c in classes])
        for i, c in enumerate(classes):
            block = set(range(i * drawn_per_class, (i + 1) * drawn_per_class))
            kept = result.index[result.labels == c].tolist()
            assert len(set(kept)) == n and set(kept) <= block and kept == sorted(kept)
            rejected = sorted(block - set(kept))
            assert float(logs[kept].min()) >= float(logs[rejected].max()) - 1e-5
        assert report["mean_score_all"] == pytest.approx(float(logs.exp().mean()), rel=1e-4)
        assert report["mean_score_kept"] == pytest.approx(float(logs[result.index].exp().mean()), rel=1e-4)
    with pytest.raises(ValueError, match="accept_rate"):
        rejection_sample(model, [0], 3, 1.5, brightness_classifier)


def test_rejection_sampling_from_the_command_line_draws_every_class_listed(class_run, tmp_path, monkeypatch, capsys):
    """`--classes 1,1,2 --accept-rate 0.5` gave 4 samples (the repeated 1 merged) where plain sampling gives 6, and
    `1,2,1` gave 6: the class list was rebuilt from the labels with their neighbouring repeats merged."""
    import numpy as np

    import vqar.eval.rejection
    from vqar.cli import main

    monkeypatch.setattr(vqar.eval.rejection, "load_classifier", lambda name: lambda images: images.new_zeros(
        len(images), 10))  # fmt: skip
    for classes, labels in (("1,1,2", [1, 1, 1, 1, 2, 2]), ("1,2,1", [1, 1, 2, 2, 1, 1])):
        out = tmp_path / classes.replace(",", "-")
        assert main(["sample", "--model", str(class_run), "--classes", classes, "--n-per-class", "2", "--accept-rate",
                     "0.5", "--classifier", "digits", "--no-images", "--out", str(out)]) == 0, capsys.readouterr().err
        with np.load(out / "samples.npz") as npz:
            assert npz["arr_1"].tolist() == labels


def test_bench_sample_cli(capsys):
    args = ["bench", "sample", "f=8", "d=2", "c=32", "model=RQ-XS", "image_size=32", "ch=32", "batch_size=4",
            "loops=1", "warmup=0", "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["code_shape"] == [4, 4, 2] and result["images_timed"] == 4
    assert result["ms_per_image_total"] == pytest.approx(
        result["ms_per_image_sampling"] + result["ms_per_image_decoding"]
    )
    assert main(["bench", "sample", "f=3"]) == 2
    assert "power of 2" in capsys.readouterr().err


def test_bench_sample_builds_every_family_through_the_registry(capsys):
    """`model=` names a size of any architecture; the tokenizer quantizes as that family needs."""
    common = ["c=32", "image_size=32", "ch=32", "batch_size=2", "loops=1", "warmup=0", "--device", "cpu", "--json"]
    for model, d, shape in (("GPT-XS", 1, [4, 4]), ("VIM-XS", 1, [4, 4]), ("RQ-XS", 1, [4, 4, 1])):
        assert main(["bench", "sample", "f=8", f"d={d}", f"model={model}", *common]) == 0
        out = capsys.readouterr().out
        result = json.loads(out[out.index("{") :])
        assert result["code_shape"] == shape and result["arch"] == model.split("-")[0].lower()
    assert main(["bench", "sample", "f=8", "d=2", "model=GPT-XS", *common]) == 2
    assert "d=2 needs an RQ-Transformer (a model=RQ-... size)" in capsys.readouterr().err  # bench has no arch=
    for model, shape in (("GPT-XS", [4, 4]), ("RQ-XS", [4, 4, 4])):  # without d: the architecture's default depth
        assert main(["bench", "sample", "f=8", f"model={model}", *common]) == 0
        out = capsys.readouterr().out
        assert json.loads(out[out.index("{") :])["code_shape"] == shape
    assert main(["bench", "sample", "f=8", "model=GPT-XS", "num_classes=0", *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_classes must be >= 1, got 0" in err and "Traceback" not in err
    assert main(["bench", "sample", "model=GPT-Q"]) == 2
    assert "unknown model size 'GPT-Q'" in capsys.readouterr().err


def test_domain_fid_is_zero_for_identical_sets(classifier_cache):
    from vqar.data.mnist import load_mnist_digits
    from vqar.eval.digits import digit_classifier, domain_fid

    images = torch.from_numpy(load_mnist_digits()[0][:200].copy()).float()[:, None] / 127.5 - 1
    classifier = digit_classifier(classifier_cache)
    assert domain_fid(images, images, classifier) == pytest.approx(0.0, abs=1e-6)
    assert domain_fid(images[:100], -images[100:], classifier) > 1.0
