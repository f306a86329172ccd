"""VAR end to end on the bundled digits: the multi-scale tokenizer trained by the stage-1 loop, its code store,
VAR trained on it through the registry, sampling, serving (the coarse-to-fine strip shows the scales) and the
throughput bench; under torchrun (slow), 2-process training equals 1-process training."""

from __future__ import annotations

import json

import pytest
import torch

from vqar.cli import main

TOKENIZER = ["steps=12", "train.eval_every=12", "data.max_images=256", "model.conv.ch=8", "model.conv.z_channels=16"]
VAR_RUN = ["size=VAR-XS", "model.dim=32", "model.n_head=2", "model.n_layer=2", "data.batch_size=32",
           "train.log_every=2", "sample.n_per_class=1", "sample.max_classes=2"]  # fmt: skip


@pytest.fixture(scope="module")
def var_store(tmp_path_factory):
    from vqar import load_pretrained
    from vqar.data import DataConfig
    from vqar.data.extraction import extract_codes
    from vqar.train.tokenizer import load_run_config, train_tokenizer

    root = tmp_path_factory.mktemp("var")
    metrics = train_tokenizer(load_run_config("var-mnist", TOKENIZER), root / "tokenizer")
    assert {f"usage_s{k}" for k in range(4)} <= set(metrics)  # codebook usage per scale
    tokenizer = load_pretrained(root / "tokenizer")
    data = DataConfig(source="mnist", max_images=300)
    extract_codes(tokenizer, data, root / "codes", tokenizer_dir=root / "tokenizer")
    return root


def test_the_store_gives_var_its_scales_and_code_size(var_store, capsys):
    from vqar.train.ar_config import describe_run_config

    manifest = json.loads((var_store / "codes" / "manifest.json").read_text())
    assert manifest["code_shape"] == [30]  # 1 + 4 + 9 + 16 codes, scale by scale
    text = describe_run_config("var-mnist", [f"codes={var_store / 'codes'}"])
    assert "patch_nums:" in text and "code_dim: 32  # from the code store" in text
    assert main(["config", "ar", "var-mnist", f"codes={var_store / 'codes'}", "model.code_dim=8"]) == 2
    assert "model.code_dim=8 contradicts the code store" in capsys.readouterr().err


def test_var_refuses_the_code_store_of_a_tokenizer_that_is_not_multi_scale():
    """Every saved quantizer config has patch_nums (empty but for VAR): the store is told apart by its kind, so a
    VQ store is named as such instead of failing later as a code_shape VAR cannot lay out."""
    from dataclasses import asdict

    from vqar.ar import get_architecture
    from vqar.quantize.config import QuantizerConfig

    manifest = {"codebook_size": 256, "code_shape": [8, 8], "num_classes": 10}
    for kind in ("vq", "rq"):
        with pytest.raises(ValueError, match=f"multi-scale tokenizer .*not of kind '{kind}'"):
            get_architecture("var").store_fields(manifest, {"quantizer": asdict(QuantizerConfig(kind=kind))})
    scales = QuantizerConfig(kind="multiscale", dim=32, patch_nums=[1, 2, 3, 4])
    fields = get_architecture("var").store_fields({**manifest, "code_shape": [30]}, {"quantizer": asdict(scales)})
    assert fields == {"patch_nums": [1, 2, 3, 4], "code_dim": 32}


def test_raster_models_refuse_the_code_store_of_a_multi_scale_tokenizer():
    """The reverse: GPT, VIM and RQ-Transformer name VAR's scales and the arch that models them, instead of a
    code_shape [30] they cannot take."""
    from dataclasses import asdict

    from vqar.ar import get_architecture
    from vqar.quantize.config import QuantizerConfig

    manifest = {"codebook_size": 256, "code_shape": [30], "num_classes": 10}
    scales = {"quantizer": asdict(QuantizerConfig(kind="multiscale", dim=32, patch_nums=[1, 2, 3, 4]))}
    for arch in ("gpt", "vim", "rq"):
        with pytest.raises(ValueError, match="multi-scale .*arch=var"):
            get_architecture(arch).store_fields(manifest, scales)
    grid = {"quantizer": asdict(QuantizerConfig(kind="vq", dim=32))}
    assert get_architecture("gpt").store_fields({**manifest, "code_shape": [8, 8]}, grid) == {}


def test_var_trains_samples_and_serves(var_store, tmp_path, capsys):
    from vqar import load_pretrained
    from vqar.sampling import SamplingSettings
    from vqar.serve.engine import GenerateRequest, SamplingEngine
    from vqar.train.ar import train_ar
    from vqar.train.ar_config import load_run_config

    cfg = load_run_config("var-mnist", [f"codes={var_store / 'codes'}", *VAR_RUN, "steps=40", "train.eval_every=40",
                                        "lr=3e-3", "train.warmup_steps=5"])  # fmt: skip
    assert cfg.loss.label_smoothing == 0.1  # the official recipe, from the preset
    train_ar(cfg, tmp_path / "ar")
    rows = [json.loads(line) for line in (tmp_path / "ar" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, (train[0]["loss"], train[-1]["loss"])
    assert {"loss_first_scale", "loss_last_scale"} <= set(train[-1])
    assert (tmp_path / "ar" / "samples_grid.png").is_file()

    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tmp_path / "ar"), "--classes", "0,1", "--n-per-class", "2", "--cfg",
                 "3", "--top-k", "50", "--smooth", "--out", str(out)]) == 0  # fmt: skip
    assert (out / "grid.png").is_file()
    capsys.readouterr()
    # --cfg-interval alone was told to add --cfg above 1, which then met the refusal below
    assert main(["sample", "--model", str(tmp_path / "ar"), "--cfg-interval", "3", "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert "VAR draws a whole scale per call: leave cfg_interval out" in err and "--cfg" not in err, err
    # a plain VQ tokenizer of VAR's codebook size was refused as "another codebook (the same size, other vectors)"
    from vqar.quantize import QuantizerConfig
    from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig

    conv = ConvConfig(in_channels=1, out_channels=1, resolution=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                      attn_resolutions=[], z_channels=8, norm_groups=4)  # fmt: skip
    dim = load_pretrained(var_store / "tokenizer").code_vectors().shape[-1]  # the same codebook shape: compared
    plain = Tokenizer(TokenizerConfig(conv=conv, quantizer=QuantizerConfig(kind="vq", codebook_size=256, dim=dim)))
    with pytest.raises(ValueError, match=r"^VAR needs a multi-scale tokenizer \(quantizer kind 'multiscale'\)$"):
        load_pretrained(tmp_path / "ar", tokenizer=plain)

    model = load_pretrained(tmp_path / "ar")
    engine = SamplingEngine(model, model.tokenizer, max_images=4)
    try:
        assert engine.describe()["levels"] == 4 and engine.describe()["code_layout"] == "scales"
        result = engine.generate(GenerateRequest(class_id=1, n=2, settings=SamplingSettings(cfg_scale=3.0, seed=5),
                                                 coarse_to_fine=True), timeout=120)  # fmt: skip
    finally:
        engine.close()
    assert len(result.coarse_to_fine) == 4  # one picture per scale, coarse to fine
    assert torch.equal(result.coarse_to_fine[-1], result.images.clamp(-1, 1))
    assert not torch.equal(result.coarse_to_fine[0], result.coarse_to_fine[-1])

    # Linear probing: the pixel baseline is resized to the finest scale (4x4); it took the codes' (30,) for a size.
    from vqar.eval.probe import linear_probe

    probe = linear_probe(model, "mnist", layer=1, max_images=200)
    assert (probe["feature_dim"], probe["pixel_dim"], probe["test_images"]) == (32, 16, 20)


def test_sample_grid_settings_var_cannot_take_are_refused_before_the_first_step(var_store, tmp_path, capsys):
    """The grid is drawn only at the first evaluation: a setting VAR refuses would otherwise end the run there,
    after its training steps, leaving a run folder to clean up."""
    run = ["train", "ar", "var-mnist", f"codes={var_store / 'codes'}", *VAR_RUN, "steps=2", "train.eval_every=2"]
    for setting, reason in [("sample.cfg_interval=3", "cfg_interval"), ("sample.speculative=true", "speculative"),
                            ("sample.top_k=[5,5]", "top_k has 2 values")]:  # fmt: skip
        out = tmp_path / setting
        assert main([*run, setting, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "sample grid's settings (sample.*)" in err and reason in err, err
        assert not out.exists()  # no step ran, no checkpoint or metrics were written
    assert main([*run, "sample.cfg_interval=3", "sample.n_per_class=0", "--out", str(tmp_path / "no-grid")]) == 0


def test_bench_sample_runs_var(capsys):
    args = ["bench", "sample", "f=8", "d=1", "c=32", "model=VAR-XS", "image_size=32", "ch=32", "batch_size=2",
            "loops=1", "warmup=0", "cfg_scale=2", "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["arch"] == "var" and result["code_shape"] == [30] and result["images_timed"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["dist.strategy=ddp"], ["dist.strategy=fsdp"]], ids=["ddp", "fsdp"])
def test_two_process_var_training_matches_one_process(var_store, tmp_path, strategy):
    from test_distributed import _assert_same_training, _vqar

    run = ["train", "ar", "var-mnist", f"codes={var_store / 'codes'}", *VAR_RUN, "model.class_dropout_prob=0",
           "model.drop_path_rate=0", "steps=6", "train.eval_every=6", "train.ckpt_every=3", "train.log_every=3",
           "sample.n_per_class=0"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _vqar([*run, "--out", str(one)], 1, tmp_path)
    _vqar([*run, *strategy, "--out", str(two)], 2, tmp_path)
    _assert_same_training(one, two)


@pytest.mark.slow
def test_two_process_var_extraction_writes_the_one_process_store(var_store, tmp_path):
    import numpy as np

    from test_distributed import _vqar
    from vqar.data.mnist import load_mnist_digits

    images, labels = load_mnist_digits()
    np.savez(tmp_path / "digits.npz", images=images[:64], labels=labels[:64])
    args = ["extract-codes", "--tokenizer", str(var_store / "tokenizer"), "--data", str(tmp_path / "digits.npz"),
            "--shard-size", "16"]
    _vqar([*args, "--out", str(tmp_path / "one")], 1, tmp_path)
    _vqar([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one["code_shape"] == two["code_shape"] == [30]
    assert one["shards"] == two["shards"]  # every shard's sha256 equal

