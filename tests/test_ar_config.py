"""Stage-2 run configurations refused where they cannot train as asked, with the setting named: next patch
prediction (NPP) levels and schedules, also on a resume, impossible widths and dropouts, a preset's architecture
and size presets, and a `vqar config` without a code store."""

from __future__ import annotations

import re

import pytest

from test_ar import _records
from vqar.cli import main
from vqar.configs import ConfigError
from vqar.train.ar_config import compose_run_config, describe_run_config, load_run_config


@pytest.fixture(scope="module")
def vq_store_4x4(tmp_path_factory):
    """A code store of 20 digits in the 4x4 codes of an untrained VQ tokenizer."""
    from conftest import random_tokenizer
    from vqar.data import DataConfig
    from vqar.data.extraction import extract_codes

    store = tmp_path_factory.mktemp("vq4") / "codes"
    extract_codes(random_tokenizer(), DataConfig(max_images=20, image_size=16, channels=1), store)
    return store


def test_an_npp_level_too_coarse_for_the_code_grid_is_named_at_configuration(vq_store_4x4):
    with pytest.raises(ValueError, match="npp.level=4 starts with 8x8 patches, which do not tile the 4x4 code grid: "
                                         "use npp.level=3 or lower"):  # fmt: skip
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=4"])
    assert load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=3"]).npp.level == 3


def test_an_npp_schedule_that_gives_a_patch_size_no_step_is_refused(vq_store_4x4):
    # int(3 * 0.5^2) = int(3 * 0.5^1) - 1 = 0: the 4x4 patches' segment would be empty, level 3 silently level 2
    with pytest.raises(ValueError, match="train.steps=3 with npp.rate=0.5 gives the 4x4 patches of npp.level=3 no "
                                         "step"):  # fmt: skip
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=3", "steps=3"])
    assert load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=3", "steps=8"]).train.steps == 8
    # int(6 * 0.25) = 1: one step of 4x4 patches, at the per-segment warmup's learning rate 0: the level trained nothing
    with pytest.raises(ValueError, match=re.escape("train.steps=6 with npp.rate=0.5 gives the 4x4 patches of "
                                                   "npp.level=3 one step, which npp.warmup_steps trains at learning "
                                                   "rate 0")):  # fmt: skip
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=3", "steps=6"])
    for setting in ("npp.warmup_steps=0", "npp.segment_lr=false"):  # no per-segment warmup: its step trains
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=3", "steps=6", setting])


@pytest.mark.parametrize("setting", ["train.warmup_steps=7", "train.min_lr_ratio=0.9"])
def test_the_runs_schedule_settings_are_refused_under_the_per_segment_schedule(vq_store_4x4, setting):
    """NPP's per-segment learning rate replaces the run's warmup and cosine: these were ignored unsaid."""
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{key} shapes the run's warmup and cosine, which next patch "
                                                    "prediction's per-segment schedule replaces")):  # fmt: skip
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=2", setting])
    with pytest.raises(ConfigError, match=re.escape(f"or npp.segment_lr=false to train with {key}")):
        describe_run_config("gpt-mnist", ["npp.level=2", setting])  # vqar config, without the store too
    cfg = load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=2", "npp.segment_lr=false", setting])
    assert cfg.train.warmup_steps == 7 or cfg.train.min_lr_ratio == 0.9  # the run's own schedule takes them
    load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", setting])  # token-level training takes them too


def test_another_arch_on_a_preset_names_the_preset_family_and_the_presets_to_use():
    """`var-mnist arch=gpt` said "unknown gpt size 'VAR-S'", the preset's size, as if the size were the mistake."""
    message = ("preset 'var-mnist' is for arch=var (VAR: next-scale prediction over multi-scale codes), not "
               "arch=gpt: to train arch=gpt, use a preset for it (gpt-imagenet, gpt-mnist), or leave arch= out")
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_run_config("var-mnist", ["arch=gpt"])
    with pytest.raises(ConfigError, match="unknown architecture 'foo'"):
        compose_run_config("var-mnist", ["arch=foo"])
    with pytest.raises(ConfigError, match="unknown gpt size 'VAR-S'"):  # the preset's family: the size is wrong
        compose_run_config("gpt-mnist", ["size=VAR-S"])


@pytest.mark.parametrize("setting", ["npp.warmup_steps=10", "npp.decay_ratio=0.5", "npp.end_lr_ratio=0"])
def test_per_segment_lr_settings_are_refused_with_segment_lr_off(vq_store_4x4, setting):
    """npp.segment_lr=false trains with the run's own warmup and cosine: these used to be ignored unsaid."""
    key, value = setting.split("=")
    with pytest.raises(ValueError, match=re.escape(f"{key}={value} shapes the learning rate of each NPP segment, "
                                                   "which npp.segment_lr=false turns off")):  # fmt: skip
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=2", "npp.segment_lr=false", setting])
    assert load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=2", setting]).npp.segment_lr
    load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=2", "npp.segment_lr=false"])  # the defaults


@pytest.mark.parametrize("settings", [["npp.rate=0.3"], ["npp.rate=0.3", "npp.decay_ratio=0.5"]])
def test_npp_settings_without_npp_level_are_refused_naming_them(vq_store_4x4, settings):
    """npp.level=1 (the default) trains token by token: npp.rate and the segment schedule were ignored unsaid."""
    named = " and ".join(settings)
    with pytest.raises(ValueError, match=re.escape(f"{named} shape{'s' * (len(settings) == 1)} next patch prediction, "
                                                   "which npp.level=1 (the default: plain next-token training) leaves "
                                                   "off: set npp.level=2 or more")):  # fmt: skip
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", *settings])
    assert load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=2", *settings]).npp.level == 2
    load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.rate=0.5"])  # the default's value: nothing unused


@pytest.mark.parametrize("ratio", ["2", "nan"])
def test_an_npp_end_lr_ratio_outside_0_1_is_refused(vq_store_4x4, ratio):
    # above 1 each segment's "decay" would raise the learning rate; nan would make it nan
    with pytest.raises(ValueError, match=f"npp.end_lr_ratio must be in \\[0, 1\\].*got 0.2, {ratio} and 100"):
        load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "npp.level=2", f"npp.end_lr_ratio={ratio}"])


def test_resuming_an_npp_run_with_more_steps_does_not_put_coarse_patches_back(vq_store_4x4, tmp_path, capsys):
    """The segment boundaries are fractions of train.steps: a level-2 run of 4 steps (2x2 patches for steps 0-1)
    resumed with steps=10 trained step 4 on 2x2 patches again (until int(10 * 0.5) = 5) after two steps of single
    tokens, unsaid."""
    from conftest import file_contents, run_cli

    run = tmp_path / "run"
    train = ["train", "ar", "gpt-mnist", f"codes={vq_store_4x4}", "size=GPT-XS", "bs=8", "npp.level=2",
             "npp.warmup_steps=1", "steps=4", "train.eval_every=4", "sample.n_per_class=0", "--out", str(run)]
    assert run_cli(train, capsys)[0] == 0
    before = file_contents(run)
    code, err = run_cli(["train", "ar", "--resume", "steps=10", "--out", str(run)], capsys)
    assert code == 2 and err == (f"vqar: error: resuming {run} after step 4 with train.steps=10, npp.level=2, "
                                 "npp.rate=0.5 would train on 2x2 patches again until step 5, where the run's last "
                                 "step (train.steps=4, npp.level=2, npp.rate=0.5) trained on single tokens: the "
                                 "schedule's boundaries scale with train.steps. Keep the run's settings to finish "
                                 "its schedule; to train on single tokens for longer, resume with npp.level=1 "
                                 "npp.warmup_steps=100 and the longer train.steps; or start a new run in another "
                                 "--out\n"), err  # fmt: skip
    assert file_contents(run) == before
    assert run_cli(["train", "ar", "--resume", "steps=8", "--out", str(run)], capsys)[0] == 0  # patches 0-3, tokens
    # The way the message offers: single tokens for the longer run.
    longer = ["train", "ar", "--resume", "steps=12", "npp.level=1", "npp.warmup_steps=100", "--out", str(run)]
    assert run_cli(longer, capsys)[0] == 0
    assert _records(run, "train")[-1]["step"] == 12


@pytest.mark.parametrize(("preset", "override", "message"), [
    ("vim-mnist", "model.dim=0", "dim and n_head must be >= 1, got dim=0"),  # was a ZeroDivisionError in training
    ("gpt-mnist", "model.n_head=0", "dim and n_head must be >= 1, got dim=.*, n_head=0"),  # in validate itself
    ("vim-mnist", "model.resid_dropout_p=1.5", "resid_dropout_p must be in \\[0, 1\\], got 1.5"),
    ("gpt-mnist", "model.ffn_dropout_p=-1", "ffn_dropout_p must be in \\[0, 1\\], got -1"),
    ("gpt-mnist", "model.norm_eps=0", "norm_eps must be positive, got 0"),  # was NaN from the first step, run 'done'
    ("gpt-mnist", "model.n_layer=0", "^n_layer must be >= 1, got 0$"),  # was "need vocab_size >= 2, ... n_layer >= 1"
])  # fmt: skip
def test_impossible_model_widths_and_dropouts_are_named_at_configuration(vq_store_4x4, preset, override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(preset, [f"codes={vq_store_4x4}", override])


def test_size_presets_fill_the_architecture_and_overrides_win(tiny_pipeline):
    codes = f"codes={tiny_pipeline / 'codes'}"
    cfg = load_run_config("rq-mnist", [codes, "size=RQ-480M"])
    assert (cfg.model.dim, cfg.model.n_layer, cfg.model.n_depth_layer) == (1536, 12, 4)
    cfg = load_run_config("rq-mnist", [codes, "size=RQ-480M", "model.n_layer=3"])
    assert cfg.model.n_layer == 3 and cfg.model.dim == 1536
    node, _ = compose_run_config("gpt-imagenet", ["size=GPT-XL"])  # no code store: the architecture is known
    assert (node.model.n_layer, node.model.dim) == (36, 1280)
    with pytest.raises(ConfigError, match="unknown rq size"):
        load_run_config("rq-mnist", ["size=GPT-B"])
    with pytest.raises(ConfigError, match="data.codes"):
        load_run_config("rq-mnist")


@pytest.mark.parametrize(
    ("override", "message"),
    [("steps=-5", "train.steps must be positive"), ("sample.top_p=2", "top_p must be in (0, 1]"),
     ("data.val_fraction=1.5", "data.val_fraction must be in (0, 1)"),
     ("loss.label_smoothing=1", "loss.label_smoothing must be in [0, 1)"),
     ("model.n_layer=0", "n_layer must be >= 1, got 0"),  # the model's own fields too: they were skipped
     ("model.dim=90", "dim=90 must be divisible by n_head=4")],
)  # fmt: skip
def test_config_without_a_store_still_refuses_what_training_would(override, message, capsys):
    # The model's data-dependent fields wait for codes=DIR, but the training, data and sampling sections are whole:
    # `vqar config` used to print an impossible value there as if it were fine.
    assert main(["config", "ar", "rq-mnist", override]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [("gpt-mnist", ["npp.rate=0.3"], "npp.rate=0.3 shapes next patch prediction, which npp.level=1"),
     ("gpt-mnist", ["npp.level=2", "npp.segment_lr=false", "npp.warmup_steps=50"],
      "npp.warmup_steps=50 shapes the learning rate of each NPP segment"),
     ("gpt-mnist", ["steps=5", "npp.level=4"], "train.steps=5 with npp.rate=0.5 gives the 8x8 patches"),
     ("gpt-mnist", ["loss.txt_weight=0.5"], "loss.txt_weight=0.5 (the caption loss of a text head) applies to arch=rq"),
     ("var-mnist", ["sample.cfg_interval=3"], "VAR draws a whole scale per call"),
     ("gpt-mnist", ["sample.smooth=true"], "which GPT does not take (VAR only)"),
     # saved in run.yaml and doing nothing, where `vqar sample` refuses the same flags
     ("vim-mnist", ["sample.greedy=true", "sample.temperature=0.5", "sample.top_k=3"],
      "sample.temperature and sample.top_k have no effect with sample.greedy, which always takes the most likely"),
     ("gpt-mnist", ["sample.speculative_window=4"], "sample.speculative_window has no effect without "
                                                     "sample.speculative"),
     # scales out of order passed beside a fitting code_shape (and without one were a code_shape mismatch)
     ("var-mnist", ["model.patch_nums=[1,3,2,4]", "model.code_shape=[30]"],
      "patch_nums must be increasing positive scale sides, got [1, 3, 2, 4]")],
)  # fmt: skip
def test_config_without_a_store_refuses_settings_that_combine_wrongly(preset, overrides, message, capsys):
    """How the sections combine (npp.* without npp.level, a text head's loss on a GPT, the grid's settings on the
    model) was checked only once codes= was given: without it, `vqar config` printed them as fine."""
    assert main(["config", "ar", preset, *overrides]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("preset", "overrides"), [
    ("rq-mnist", ["sample.top_k=[5,5,5,5]"]),  # a value per depth: the depth is the store's
    ("rq-mnist-text", ["loss.txt_weight=0.5"]),  # the captions are the store's
    ("gpt-mnist", ["npp.level=4"]),  # the code grid is the store's
    *[(preset, []) for preset in ("gpt-imagenet", "gpt-mnist", "rq-imagenet", "rq-mnist", "rq-mnist-text",
                                  "var-imagenet", "var-mnist", "vim-imagenet", "vim-mnist")],
])  # fmt: skip
def test_config_without_a_store_leaves_what_hangs_on_the_store_to_it(preset, overrides, capsys):
    """The architecture's defaults stand in for the store's fields: nothing that only the store decides is refused
    on their account."""
    assert main(["config", "ar", preset, *overrides]) == 0, capsys.readouterr().err


def test_condition_dropout_is_refused_for_an_unconditional_store_and_the_presets_is_zeroed(vq_store_4x4, tmp_path):
    """Saved as given in config.json, and ignored: a store without classes or captions has no condition to drop."""
    import numpy as np

    from conftest import random_tokenizer
    from vqar.data import DataConfig, load_mnist_digits
    from vqar.data.extraction import extract_codes

    np.savez(tmp_path / "unlabelled.npz", images=load_mnist_digits()[0][:20])
    store = tmp_path / "codes"
    extract_codes(random_tokenizer(), DataConfig(source=str(tmp_path / "unlabelled.npz"), image_size=16, channels=1),
                  store)  # fmt: skip
    assert load_run_config("gpt-mnist", [f"codes={store}"]).model.class_dropout_prob == 0.0  # the preset says 0.1
    assert "  class_dropout_prob: 0.0\n" in describe_run_config("gpt-mnist", [f"codes={store}"])  # vqar config too
    assert load_run_config("gpt-mnist", [f"codes={vq_store_4x4}"]).model.class_dropout_prob == 0.1  # with classes
    with pytest.raises(ConfigError, match=re.escape(
            f"model.class_dropout_prob=0.5 drops the class or caption for guidance, and the code store {store} has "
            "neither (an unconditional model): leave it out")):  # fmt: skip
        load_run_config("gpt-mnist", [f"codes={store}", "model.class_dropout_prob=0.5"])
    # A grid's guidance given for a model with no null condition: it was drawn without guidance, with a warning
    assert load_run_config("gpt-mnist", [f"codes={store}"]).sample.cfg_scale == 1.5  # the preset's: warned in training
    cases = [(store, [], "an unconditional model"),
             (vq_store_4x4, ["model.class_dropout_prob=0"], "model.class_dropout_prob=0")]
    for codes, extra, why in cases:
        message = f"sample.cfg_scale=2 guides the sample grid with the null condition, which {why} does not learn"
        for read in (load_run_config, describe_run_config):
            with pytest.raises(ConfigError, match=re.escape(message)):
                read("gpt-mnist", [f"codes={codes}", *extra, "sample.cfg_scale=2"])
        load_run_config("gpt-mnist", [f"codes={codes}", *extra, "sample.cfg_scale=2", "sample.n_per_class=0"])
    load_run_config("gpt-mnist", [f"codes={vq_store_4x4}", "sample.cfg_scale=2"])  # with its null class


def test_config_refuses_the_sample_grid_settings_training_refuses(vq_store_4x4, capsys):
    """`vqar config ar gpt-mnist codes=DIR sample.smooth=true` printed the configuration, which training then refused
    before its first step."""
    assert main(["config", "ar", "gpt-mnist", f"codes={vq_store_4x4}", "sample.smooth=true"]) == 2
    assert capsys.readouterr().err == ("vqar: error: the sample grid's settings (sample.*) do not fit the model: "
                                       "smooth sampling feeds back a mix of code vectors, which GPT does not take "
                                       "(VAR only)\n")  # fmt: skip
    assert main(["config", "ar", "gpt-mnist", f"codes={vq_store_4x4}", "sample.smooth=true",
                 "sample.n_per_class=0"]) == 0  # no grid drawn: nothing to refuse  # fmt: skip


@pytest.mark.parametrize("level", [0, 13, 10**9])
def test_an_npp_level_out_of_range_is_refused_at_once(level):
    """npp.level=100000 ended after 11 s in Python's limit on integer digits, 10^9 hung: the schedule's arithmetic
    ran over every level before anything named it."""
    with pytest.raises(ConfigError, match=re.escape(f"npp.level must be in [1, 12] (its first patches are "
                                                    f"2^(level-1) codes a side) and npp.rate in (0, 1), got {level}")):
        describe_run_config("gpt-mnist", [f"npp.level={level}"])
