"""Presets, overrides, shorthands and the errors that bad configurations give."""

from __future__ import annotations

import re

import pytest

from vqar.configs import ConfigError, preset_names, to_yaml
from vqar.tokenizers import Tokenizer
from vqar.train.tokenizer import TokenizerRunConfig, load_run_config


def test_shipped_tokenizer_presets():
    names = preset_names("tokenizer")
    for expected in (
        "rqvae-mnist",
        "vq-mnist",
        "vq-mnist-4x4",
        "rqvae-imagenet256",
        "llamagen-vq16",
        "llamagen-vq8",
    ):
        assert expected in names


@pytest.mark.parametrize(
    ("preset", "code_shape"),
    [("rqvae-mnist", (4, 4, 4)), ("vq-mnist", (8, 8)), ("vq-mnist-4x4", (4, 4))],
)
def test_small_presets_give_the_promised_code_grids(preset, code_shape):
    cfg = load_run_config(preset)
    assert cfg.data.source == "mnist" and cfg.data.image_size == 32
    assert Tokenizer(cfg.model).code_shape() == code_shape


def test_overrides_and_shorthands():
    cfg = load_run_config("rqvae-mnist", ["d=2", "c=512", "train.lr=3e-4", "model.conv.ch_mult=[1,2,2,2]", "bs=8"])
    assert cfg.model.quantizer.depth == 2
    assert cfg.model.quantizer.codebook_size == 512
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.conv.ch_mult == [1, 2, 2, 2]
    assert cfg.data.batch_size == 8
    assert isinstance(cfg, TokenizerRunConfig)


def test_unknown_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_run_config("rqvae-mnist", ["model.quantizer.deph=3"])
    message = str(err.value)
    assert "'model.quantizer.deph'" in message
    assert "did you mean 'model.quantizer.depth'" in message
    assert "codebook_size" in message and "shared_codebook" in message
    assert "d=model.quantizer.depth" in message  # shorthands are listed too


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"Valid keys at the top level: data, dist, loss, model, train"):
        load_run_config("rqvae-mnist", ["optim.lr=1"])


def test_ill_typed_value_and_bad_syntax():
    with pytest.raises(ConfigError, match="model.quantizer.depth"):
        load_run_config("rqvae-mnist", ["d=four"])
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config("rqvae-mnist", ["depth"])


def test_a_scalar_given_to_a_list_field_says_it_takes_a_list():
    """OmegaConf's own words ("AnyNode is not a ListConfig, TupleConfig, list, or tuple") name no remedy."""
    with pytest.raises(ConfigError, match=re.escape("train.betas takes a list, got 0.9: write the items in brackets, "
                                                    "e.g. train.betas=[0.9]")):  # fmt: skip
        load_run_config("var-mnist", ["train.betas=0.9"])
    with pytest.raises(ConfigError, match=re.escape("model.quantizer.patch_nums takes a list, got 4")):
        load_run_config("var-mnist", ["model.quantizer.patch_nums=4"])


def test_a_value_given_to_a_group_of_settings_names_the_group_and_its_keys(tmp_path):
    """OmegaConf said "Merge error: int is not a subclass of ConvConfig. value: 3", naming no key."""
    for override, group, value, first in [("model.conv=3", "model.conv", "3", "in_channels"),
                                          ("model.quantizer=[1,2]", "model.quantizer", "[1, 2]", "kind"),
                                          ("train=0.5", "train", "0.5", "steps")]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(f"{group} is a group of settings, not a value (got {value}): "
                                                        f"set its keys one by one, e.g. {group}.{first}=...; its "
                                                        "keys: ")) as err:  # fmt: skip
            load_run_config("rqvae-mnist", [override])
        assert str(err.value).count("\n") == 0
    assert str(err.value).endswith("its keys: steps, lr, betas, weight_decay, warmup_steps, min_lr_ratio, grad_clip, "
                                   "log_every, eval_every, ckpt_every, keep_checkpoints, max_nonfinite_steps, seed, "
                                   "device, precision, ema_decay, logger, wandb_project")  # fmt: skip
    preset = tmp_path / "run.yaml"
    preset.write_text("model:\n  conv: 3\n")  # in a YAML file too
    with pytest.raises(ConfigError, match=re.escape("model.conv is a group of settings, not a value (got 3)")):
        load_run_config(preset)


@pytest.mark.parametrize("eps", ["0", "-1"])
def test_an_ema_codebook_smoothing_that_is_not_positive_is_refused(eps):
    """With eps <= 0 the EMA update divides by zero or a negative count: the run ends 'done' with NaN metrics."""
    with pytest.raises(ConfigError, match="eps .*must be positive"):
        load_run_config("var-mnist", [f"model.quantizer.eps={eps}"])
    load_run_config("var-mnist", [f"model.quantizer.eps={eps}", "model.quantizer.ema=false"])  # unused there


@pytest.mark.parametrize("decay", ["0", "1", "1.5"])
def test_an_ema_codebook_decay_outside_0_1_is_refused_naming_the_setting(decay):
    """The codebook's own check said "EMA decay must be in (0, 1)", naming no setting, and only once it was built."""
    with pytest.raises(ConfigError, match=re.escape(f"model.quantizer.decay (the EMA codebook's decay) must be in (0, "
                                                    f"1), got {float(decay)}")):  # fmt: skip
        load_run_config("vq-mnist", [f"model.quantizer.decay={decay}"])
    load_run_config("vq-mnist", [f"model.quantizer.decay={decay}", "model.quantizer.ema=false"])  # unused there


def test_invalid_combinations_are_rejected():
    with pytest.raises(ConfigError, match="kind='rq'"):
        load_run_config("vq-mnist", ["d=4"])
    with pytest.raises(ConfigError, match="data.channels"):
        load_run_config("rqvae-mnist", ["data.channels=3"])
    with pytest.raises(ConfigError, match="data.image_size"):
        load_run_config("rqvae-mnist", ["data.image_size=64"])
    with pytest.raises(ConfigError, match="not divisible"):
        load_run_config("rqvae-mnist", ["data.image_size=36", "model.conv.resolution=36"])
    with pytest.raises(ConfigError, match="precision"):
        load_run_config("rqvae-mnist", ["train.precision=fp8"])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}"])
def test_an_empty_yaml_file_is_named_as_such(tmp_path, capsys, text):
    # It used to give the schema's defaults, refused for a setting nobody gave (data.channels=1 must equal ...).
    from conftest import run_cli

    (tmp_path / "empty.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"^\S*empty.yaml is empty: it holds no settings \(name a preset"):
        load_run_config(str(tmp_path / "empty.yaml"))
    run = tmp_path / "run"  # a run whose run.yaml was emptied
    run.mkdir()
    (run / "run.yaml").write_text(text)
    code, err = run_cli(["train", "tokenizer", "--resume", "--out", str(run)], capsys)
    assert code == 2 and err == f"vqar: error: {run / 'run.yaml'} is empty: it holds no settings (name a preset, " \
                                "see `vqar presets`, or a YAML file that sets the run)\n", err  # fmt: skip


def test_a_setting_tokenizer_training_would_ignore_is_refused():
    # train.ema_decay is the AR stage's; a tokenizer run used to train without EMA weights, saying nothing.
    message = "train.ema_decay=0.999 keeps EMA weights of AR models only; a tokenizer trains without them: set " \
              "train.ema_decay=null"  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_run_config("rqvae-mnist", ["train.ema_decay=0.999"])
    assert load_run_config("rqvae-mnist", ["train.ema_decay=null"]).train.ema_decay is None


def test_a_tokenizer_run_under_fsdp_is_refused_by_config_as_by_train(tmp_path, capsys):
    """`vqar config tokenizer ... dist.strategy=fsdp` printed the config, which `vqar train` then refused."""
    from conftest import run_cli

    message = "vqar: error: tokenizers train with dist.strategy=ddp (FSDP is for AR models), not fsdp\n"
    for command in (["config"], ["train"]):
        out = ["--out", str(tmp_path / "run")] if command == ["train"] else []
        code, err = run_cli([*command, "tokenizer", "rqvae-mnist", "dist.strategy=fsdp", *out], capsys)
        assert code == 2 and err == message, (command, err)
    assert not (tmp_path / "run").exists()


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="rqvae-mnist"):
        load_run_config("no-such-preset")


def test_yaml_file_preset_round_trip(tmp_path):
    cfg = load_run_config("rqvae-mnist", ["d=3"])
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    assert load_run_config(path) == cfg
    path.write_text(to_yaml(cfg).replace("depth: 3", "depht: 3"))
    with pytest.raises(ConfigError, match="depht"):
        load_run_config(path)


def test_paper_presets_build_with_the_published_sizes():
    """The ImageNet RQ-VAE has 104.4M parameters with its codebook (paper, appendix); both LlamaGen VQ models
    build too. Built on the meta device: nothing is allocated."""
    import torch

    with torch.device("meta"):
        rq = Tokenizer(load_run_config("rqvae-imagenet256").model)
        vq16 = Tokenizer(load_run_config("llamagen-vq16").model)
        vq8 = Tokenizer(load_run_config("llamagen-vq8").model)
    n_rq = sum(p.numel() for p in rq.parameters())
    assert abs(n_rq / 1e6 - 104.4) < 0.5, n_rq
    assert rq.code_shape() == (8, 8, 4) and rq.codebook_size == 16384
    assert vq16.code_shape() == (16, 16) and vq8.code_shape() == (32, 32)
    assert vq16.quantizer.codebook.weight.shape == (16384, 8)


@pytest.mark.parametrize("command", [["config", "ar"], ["config", "tokenizer"], ["train", "ar"], ["resume", "ar"]])
def test_a_yaml_file_that_does_not_parse_is_one_line_for_every_command(tmp_path, capsys, command):
    """The AR commands read a YAML's arch before its schema, with the parser's traceback where it did not parse."""
    from conftest import run_cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: [conv\n")
    if command[0] == "resume":  # a run whose run.yaml was damaged
        (tmp_path / "run").mkdir()
        bad = tmp_path / "run" / "run.yaml"
        bad.write_text("garbage: [\n")
        args = ["train", "ar", "--resume", "--out", str(tmp_path / "run")]
    else:
        args = [*command, str(bad)] + (["--out", str(tmp_path / "run")] if command[0] == "train" else [])
    code, err = run_cli(args, capsys)
    assert code == 2 and err.startswith(f"vqar: error: cannot parse {bad}: while parsing a flow"), err
    assert err.count("\n") <= 4 and "Traceback" not in err  # the parser's own lines say where


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.conv.norm_groups=0", "norm_groups must be >= 1, got 0"),  # a ZeroDivisionError, even in vqar config
        ("model.conv.ch=-16", "ch must be >= 1, got -16"),
        ("model.conv.z_channels=0", "z_channels must be >= 1, got 0"),
        ("model.conv.ch_mult=[1,-2,4,4]", "ch_mult's entries must be >= 1 and num_res_blocks >= 0"),
        ("model.conv.num_res_blocks=-1", "num_res_blocks=-1"),  # silently built fewer blocks than 0
        ("model.conv.attn_resolutions=[7]", "attn_resolutions [7] match no level: the feature maps are 32, 16, 8, "
                                            "4 wide"),  # silently no attention there  # fmt: skip
        ("loss.disc_channels=0", "loss.disc_channels must be >= 1, got 0"),
    ],
)
def test_a_size_no_network_can_have_is_named_at_configuration(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config("rqvae-mnist", [override])


@pytest.mark.parametrize("setting", ["mlp_ratio", "initializer_range", "multiple_of", "ffn_dim_multiplier"])
def test_an_ar_width_factor_or_init_scale_that_is_not_positive_is_named(setting):
    from vqar.ar import GPTConfig, RQTransformerConfig

    config = RQTransformerConfig() if setting == "mlp_ratio" else GPTConfig()
    setattr(config, setting, -1)
    with pytest.raises(ValueError, match=rf"^{setting} must be positive, got -1$"):
        config.validate()
    setattr(config, setting, float("nan"))
    with pytest.raises(ValueError, match=rf"^{setting} must be positive, got nan$"):
        config.validate()


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("vitvqgan-mnist", ["model.conv.ch=-16"], "model.conv.ch=-16 shapes the conv backbone, which model.arch=vit "
                                                  "does not build: leave it out"),
        ("vq-mnist", ["model.vit.encoder=L"], "model.vit.encoder=L shapes the vit backbone, which model.arch=conv"),
        ("vq-mnist", ["loss.r1_weight=10"], "loss.r1_weight=10.0 shapes the discriminator, which loss.disc_weight=0 "
                                            "leaves out: set loss.disc_weight above 0 to train one, or leave it out"),
        ("vq-mnist", ["loss.disc_arch=stylegan"], "loss.disc_arch=stylegan shapes the discriminator, which"),
        ("vq-mnist", ["loss.disc_weight=0.1", "loss.disc_arch=stylegan", "loss.disc_norm=group"],
         "loss.disc_norm=group shapes the PatchGAN discriminator, and loss.disc_arch=stylegan builds the StyleGAN one"),
        ("vitvqgan-mnist", ["loss.lpips_vgg=vgg16.pth"], "loss.lpips_vgg=vgg16.pth holds the perceptual loss's "
                                                         "weights, which loss.perceptual_weight=0 leaves out"),
        ("vq-mnist", ["loss.lpips_lin=lin.pth"], "loss.lpips_lin=lin.pth holds the perceptual loss's weights"),
    ],
)  # fmt: skip
def test_settings_of_a_network_the_run_does_not_build_are_refused(preset, overrides, message):
    """The inactive backbone's section and a discriminator that is off took anything (`model.conv.ch=-16` on a
    ViT-VQGAN), saved it in run.yaml and trained without it."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(preset, overrides)
    load_run_config(preset, [])  # the presets themselves set nothing unbuilt
    load_run_config("vq-mnist", ["loss.disc_weight=0.1", "loss.disc_arch=stylegan", "loss.r1_weight=10"])


def test_a_tokenizer_run_whose_losses_all_skip_the_decoder_is_refused():
    """Every reconstruction weight at 0 (the perceptual loss being off without its weights) trained with a loss of
    0: weight decay alone moved the weights, and validation read 5.4 dB."""
    zero = ["loss.recon_weight=0", "loss.logit_laplace_weight=0", "loss.quantizer_weight=0"]
    with pytest.raises(ConfigError, match="no loss reaches the decoder: loss.recon_weight, loss.logit_laplace_weight"):
        load_run_config("vitvqgan-mnist", zero)
    load_run_config("vitvqgan-mnist", [*zero, "loss.logit_laplace_weight=0.1"])
    load_run_config("vq-mnist", [*zero, "loss.disc_weight=0.1"])  # an adversarial decoder: a choice, not an accident


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_a_discriminator_learning_rate_that_is_none_is_refused(value):
    """0 was taken as 'unset' (train.lr trained the discriminator), -1 ended in torch's 'Invalid learning rate'
    naming no setting, inf in NaN weights with advice to lower train.lr."""
    with pytest.raises(ConfigError, match=re.escape("loss.disc_lr must be a positive learning rate (or null: "
                                                    f"train.lr's), got {float(value)}")):  # fmt: skip
        load_run_config("vq-mnist", ["loss.disc_weight=0.1", f"loss.disc_lr={value}"])
    assert load_run_config("vq-mnist", ["loss.disc_weight=0.1", "loss.disc_lr=1e-5"]).loss.disc_lr == 1e-5


@pytest.mark.parametrize("arch", ["vim", "rq"])
def test_a_gelu_other_than_the_two_built_is_refused(arch):
    """VIM took any `gelu` and built the sigmoid form for all but "exact" (config.json then said "tanh")."""
    from vqar.ar import RQTransformerConfig, VIMConfig
    from vqar.ar.layers import GELUS, GPT2FeedForward, SigmoidGELU

    config = VIMConfig() if arch == "vim" else RQTransformerConfig()
    config.gelu = "tanh"
    with pytest.raises(ValueError, match=r"^gelu must be 'exact' or 'sigmoid', got 'tanh'$"):
        config.validate()
    with pytest.raises(ValueError, match="got 'tanh'"):
        GPT2FeedForward(8, 16, True, "tanh", 0.0)
    assert isinstance(GPT2FeedForward(8, 16, True, "sigmoid", 0.0).act, SigmoidGELU)
    assert set(GELUS) == {"exact", "sigmoid"}


@pytest.mark.parametrize(
    ("preset", "override", "message"),
    [
        ("var-mnist", "model.quantizer.shared_codebook=false", "a multiscale quantizer has one codebook: leave it out"),
        ("vq-mnist", "model.quantizer.shared_codebook=false", "a vq quantizer has one codebook: leave it out"),
        ("rqvae-mnist", "data.captions=digits", "data.captions=digits is for text-to-image training, which reads"),
    ],
)
def test_a_tokenizer_setting_that_would_be_saved_and_ignored_is_refused(preset, override, message):
    """Both were written to run.yaml and trained the very weights of a run without them."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(preset, [override])


@pytest.mark.parametrize(("setting", "why"), [("token_dropout_p=0.9", "drops no input codes"),
                                              ("initializer_range=0.5", "takes the official scales")])  # fmt: skip
def test_a_var_setting_that_would_be_saved_and_ignored_is_refused(setting, why):
    """Both were written to run.yaml and trained the very weights of a run without them."""
    from vqar.ar.var import VARConfig

    name, value = setting.split("=")
    with pytest.raises(ValueError, match=rf"^{setting} does nothing in VAR, which {re.escape(why)}"):
        VARConfig(**{name: float(value)}).validate()
    VARConfig().validate()
