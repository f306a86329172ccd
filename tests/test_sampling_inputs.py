"""Sampling's inputs: bad settings, conditions, batches, shards, seeds and indices refused with the reason before
any work, and NumPy or torch numbers taken as the numbers they hold."""

from __future__ import annotations

import re

import pytest
import torch

from test_sampling import tiny_gpt, tiny_rq
from vqar.sampling import SamplingSettings, generate


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_p": 2.0}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"cfg_scale": 0.5}, "cfg_scale"),
        ({"cfg_scale": float("inf")}, "cfg_scale"),
        ({"cfg_interval": -5}, "cfg_interval"),
        ({"seed": -1}, "seed"),
        ({"greedy": "yes"}, "greedy"),
    ],
)
def test_bad_sampling_settings_raise_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**fields).validate()
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), torch.tensor([0]), SamplingSettings(**fields))


def test_bad_conditions_raise():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        generate(model, torch.tensor([5]))
    with pytest.raises(ValueError, match="depth 3"):
        generate(tiny_rq(), torch.tensor([0]), SamplingSettings(top_k=[1, 2]))
    with pytest.raises(ValueError, match="depth 1"):
        generate(model, torch.tensor([0]), SamplingSettings(top_k=[1, 2]))
    no_null = tiny_gpt(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        generate(no_null, torch.tensor([0]), SamplingSettings(cfg_scale=2.0))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 5, 4, dtype=torch.long), torch.tensor([0]))


def test_make_conditions_takes_numpy_and_torch_class_ids_and_refuses_one_id_or_a_string():
    """`classes=np.array([3, 4])` was "unknown class id 3, 4" (both exist), a tensor a torch error about truth
    values, `classes=3` a TypeError, and `classes="34"` "unknown class id 3, 4"."""
    import numpy as np

    from vqar.sampling import make_conditions

    model = tiny_gpt()
    for classes in (np.array([3, 4]), torch.tensor([3, 4]), [np.int64(3), np.int32(4)]):
        conditions = make_conditions(model, classes=classes, n_per_condition=np.int64(2))
        assert conditions.labels.tolist() == [3, 3, 4, 4] and conditions.rows.dtype == torch.long
    with pytest.raises(ValueError, match=r"classes must be a list of class ids, got the single id 3: give \[3\]$"):
        make_conditions(model, classes=np.int64(3))
    with pytest.raises(ValueError, match=r"classes must be a list of class ids, got '34' \(str\)$"):
        make_conditions(model, classes="34")
    with pytest.raises(ValueError, match=r"classes must be a 1-D list of class ids, got an array of shape \(1, 2\)"):
        make_conditions(model, classes=torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match=r"unknown class id 5, True: this model has classes 0..4"):
        make_conditions(model, classes=np.array([5, 2]).tolist() + [True])
    with pytest.raises(ValueError, match="this model is unconditional"):
        make_conditions(tiny_gpt(num_classes=0), classes=np.array([1]))


def test_the_python_api_names_odd_inputs_in_one_line():
    """Each was a raw torch or Python error: `generate(batch_size=-1)` "negative dimension", `batch_size=2.0` a
    full() TypeError, a list as noise an AttributeError, `temperature=10**400` an OverflowError; class ids as int16
    or uint8 tensors were "cond must be a 1-D integer tensor of class ids" (they are), a dict of classes gave its
    keys, and cfg_scale=1000001 was refused as "at most 1,000,000 ..., got 1e+06"."""
    import numpy as np

    from vqar.sampling import make_conditions

    model = tiny_rq()
    unconditional = tiny_gpt(num_classes=0)
    for batch_size in (-1, 2.0, True, "2"):
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive integer \(with cond=None\), got "
                                             rf"{re.escape(repr(batch_size))}$"):  # fmt: skip
            generate(unconditional, None, batch_size=batch_size)
    assert generate(unconditional, None, batch_size=np.int64(2)).shape[0] == 2
    with pytest.raises(TypeError, match=r"^noise must be a tensor of shape \(1, 18\), got list$"):
        generate(model, torch.tensor([1]), noise=[[0.5] * 18])
    for name in ("temperature", "cfg_scale"):
        with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
            SamplingSettings(**{name: 10**400}).validate()
    with pytest.raises(ValueError, match=r"cfg_scale must be at most 1,000,000 .*, got 1000001$"):
        SamplingSettings(cfg_scale=1_000_001).validate()
    plain = generate(model, torch.tensor([1, 2]))
    for dtype in (torch.int16, torch.int8, torch.uint8):
        assert torch.equal(generate(model, torch.tensor([1, 2], dtype=dtype)), plain), dtype
    with pytest.raises(TypeError, match=r"^cond must be a 1-D tensor of class ids of an integer dtype \(int64, int32, "
                                        r"int16, int8, uint8\), got a 1-D tensor of float32$"):  # fmt: skip
        generate(model, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"^classes must be a list of class ids, got a dict; n_per_condition gives "
                                         r"the number of images per class$"):  # fmt: skip
        make_conditions(model, classes={1: 2})


def test_a_class_id_given_as_a_string_is_named_as_one():
    """`classes=["3"]` (ids read from a text file or a form) was refused as "unknown class id 3: this model has
    classes 0..4", which names 3 as unknown though it is one of them."""
    from vqar.sampling import make_conditions

    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"unknown class id '3', 'cat': this model has classes 0..4 \(class ids are "
                                         r"integers; the model holds no class names\)$"):
        make_conditions(model, classes=["3", "cat"])
    with pytest.raises(ValueError, match=r"unknown class id 7: this model has classes 0..4$"):
        make_conditions(model, classes=[7])


def test_numpy_numbers_are_taken_as_the_numbers_they_hold():
    """`SamplingSettings(top_k=np.int64(5))` was refused as "top_k must be an integer >= 1, got np.int64(5)", and so
    were NumPy seeds, top_p, cfg_scale, per-depth arrays and `draw(batch_size=np.int64(4))`."""
    import numpy as np

    from vqar.sampling import draw, make_conditions

    numpy = SamplingSettings(temperature=np.array([1.0, 0.5, 0.7]), top_k=np.int64(5), top_p=np.float64(0.9),
                             cfg_scale=np.float64(2.0), seed=np.int64(3), greedy=np.bool_(False))  # fmt: skip
    plain = SamplingSettings(temperature=[1.0, 0.5, 0.7], top_k=5, top_p=0.9, cfg_scale=2.0, seed=3, greedy=False)
    assert numpy == plain and numpy.batch_key() == plain.batch_key()
    model = tiny_rq()
    conditions = torch.tensor([1, 2])
    assert torch.equal(generate(model, conditions, numpy), generate(model, conditions, plain))

    class Codes:  # a stand-in tokenizer: the drawn codes as they are
        codebook_size, depth = model.codebook_size, model.depth

        def decode(self, codes, depth=None):
            return codes.float()

    drawn = draw(model, make_conditions(model, classes=[1, 2, 3]), plain, tokenizer=Codes(), batch_size=np.int64(2))
    assert len(drawn.codes) == 3


def test_generate_and_draw_refuse_what_they_cannot_draw():
    """An empty batch was torch's "cannot reshape tensor of 0 elements", a batch_size that disagrees with cond was
    ignored (2 images for batch_size=3), and a list of ids or a dict of settings given to draw an AttributeError."""
    from vqar.sampling import draw, make_conditions

    model = tiny_rq()
    with pytest.raises(ValueError, match=r"nothing to draw: the batch is empty"):
        generate(model, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"batch_size=3 disagrees with cond, which holds 2 conditions"):
        generate(model, torch.tensor([1, 2]), batch_size=3)
    assert generate(model, torch.tensor([1, 2]), batch_size=2).shape[0] == 2
    with pytest.raises(TypeError, match=r"conditions must be Conditions \(from make_conditions"):
        draw(model, [1, 2])
    with pytest.raises(TypeError, match=r"settings must be SamplingSettings \(SamplingSettings\(\*\*options\)\), got "
                                        "dict"):
        draw(model, make_conditions(model, classes=[1]), {"seed": 1})


def test_generate_refuses_noise_that_is_not_uniform_numbers():
    """NaN, inf or numbers outside [0, 1) passed as `noise` drew every code as the first or the last of the
    vocabulary without a word."""
    model = tiny_gpt()
    cond = torch.tensor([1, 2])
    good = torch.rand(2, model.num_positions)
    assert generate(model, cond, noise=good).shape == (2, *model.code_shape)
    for bad in (float("nan"), float("inf"), 1.0, -0.5):
        noise = good.clone()
        noise[1, 3] = bad
        with pytest.raises(ValueError, match=r"^noise must hold uniform numbers in \[0, 1\), as image_noise makes"):
            generate(model, cond, noise=noise)


def test_generate_refuses_settings_given_as_a_dict():
    """`generate(model, cond, {"seed": 1})` was an AttributeError ('dict' object has no attribute 'per_depth'), and
    an empty dict, to generate or draw, was replaced by the default settings without a word."""
    from vqar.sampling import draw, make_conditions

    model = tiny_rq()
    refusal = r"settings must be SamplingSettings \(SamplingSettings\(\*\*options\)\), got dict"
    for settings in ({"seed": 1}, {}):
        with pytest.raises(TypeError, match=refusal):
            generate(model, torch.tensor([1]), settings)
        with pytest.raises(TypeError, match=refusal):
            draw(model, make_conditions(model, classes=[1]), settings)
    assert generate(model, torch.tensor([1]), None).shape[0] == 1


@pytest.mark.parametrize("make", [tiny_gpt, tiny_rq])
def test_a_teacher_forced_pass_refuses_a_condition_per_row_that_does_not_fit_the_codes(make):
    """`model(codes, cond)` with one class id for two code grids was torch's "Sizes of tensors must match except
    in dimension 1" from inside the model."""
    model = make()
    codes = torch.randint(0, model.codebook_size, (2, *model.code_shape))
    for cond in (torch.tensor([3]), torch.tensor([3, 1, 2])):
        with pytest.raises(ValueError, match=rf"cond holds {len(cond)} class ids for 2 code grids"):
            model(codes, cond)
    assert model(codes, torch.tensor([3, 1])).logits.shape[:2] == (2, model.code_shape[0])


class CodesAsImages:
    """A stand-in tokenizer for `draw`: the drawn codes as they are."""

    def __init__(self, model):
        self.codebook_size, self.depth = model.codebook_size, model.depth

    def decode(self, codes, depth=None):
        return codes.float()


def test_draw_refuses_a_shard_that_names_no_shard():
    """`draw(..., shard=(3, 2))` or a negative index drew nothing without a word, and a count of 0 was a
    ZeroDivisionError."""
    import numpy as np

    from vqar.sampling import draw, make_conditions

    model = tiny_rq()
    conditions = make_conditions(model, classes=[1, 2, 3])
    for shard in ((3, 2), (2, 2), (-1, 2), (0, 0), (0, -1), (0.0, 1), (True, 2), (0,)):
        with pytest.raises(ValueError, match=rf"^shard={re.escape(repr(shard))} names no shard: give \(index, count\) "
                                             r"with count >= 1 and index in \[0, count\)$"):  # fmt: skip
            draw(model, conditions, tokenizer=CodesAsImages(model), batch_size=1, shard=shard)
    drawn = draw(model, conditions, tokenizer=CodesAsImages(model), batch_size=1, shard=(np.int64(1), 2))
    assert drawn.index.tolist() == [1]


def test_draw_refuses_seeds_or_index_that_are_not_one_per_image():
    """Too few `seeds` ended in an IndexError in the batch that ran out, extras were ignored without a word, and a
    list of seeds was an AttributeError ('list' object has no attribute 'tolist')."""
    from vqar.sampling import draw, make_conditions

    model = tiny_rq()
    conditions = make_conditions(model, classes=[1, 2, 3])
    for name in ("seeds", "index"):
        for values, count in (([4, 5], 2), ([4, 5, 6, 7], 4)):
            with pytest.raises(ValueError, match=rf"^{name} holds {count} values for 3 images: give one per image$"):
                draw(model, conditions, tokenizer=CodesAsImages(model), batch_size=1, **{name: torch.tensor(values)})
        with pytest.raises(ValueError, match=rf"^{name} must hold one value per image \(3\), got shape \(\)$"):
            draw(model, conditions, tokenizer=CodesAsImages(model), **{name: torch.tensor(4)})
        for values, message in (([4, -1, 5], "integers >= 0, got -1"), ([0.5, 1.5, 2.5], "integers, got torch.float32"),
                                ([True, False, True], "integers, got torch.bool")):  # fmt: skip
            with pytest.raises(ValueError, match=rf"^{name} must be {re.escape(message)}$"):
                draw(model, conditions, tokenizer=CodesAsImages(model), **{name: torch.tensor(values)})
    listed = draw(model, conditions, tokenizer=CodesAsImages(model), batch_size=2, seeds=[4, 5, 6])
    assert torch.equal(listed.codes, draw(model, conditions, tokenizer=CodesAsImages(model),
                                          seeds=torch.tensor([4, 5, 6])).codes)  # fmt: skip


def test_draw_takes_unsigned_seeds_and_index_as_the_numbers_they_hold():
    """NumPy's `SeedSequence.generate_state` gives uint32 seeds, which ended in torch's NotImplementedError
    ("min_all" not implemented for 'UInt32'), as did uint16 / uint64 arrays and tensors."""
    import numpy as np

    from vqar.sampling import draw, make_conditions

    model = tiny_rq()
    conditions = make_conditions(model, classes=[1, 2, 3])
    signed = draw(model, conditions, tokenizer=CodesAsImages(model), seeds=torch.tensor([4, 5, 2**32 - 1]))
    for dtype in (np.uint16, np.uint32, np.uint64):
        drawn = draw(model, conditions, tokenizer=CodesAsImages(model), seeds=np.array([4, 5, 2**32 - 1], np.uint64
                     ).astype(dtype), index=np.array([0, 1, 2], dtype))  # fmt: skip
        expected = signed if dtype != np.uint16 else draw(model, conditions, tokenizer=CodesAsImages(model),
                                                          seeds=[4, 5, 2**16 - 1])  # fmt: skip
        assert torch.equal(drawn.codes, expected.codes), dtype
    unsigned = torch.tensor([4, 5, 2**32 - 1], dtype=torch.uint32)
    assert torch.equal(draw(model, conditions, tokenizer=CodesAsImages(model), seeds=unsigned).codes, signed.codes)
    with pytest.raises(ValueError, match=r"^seeds must be integers in \[0, 2\^63\), got 9223372036854775808$"):
        draw(model, conditions, tokenizer=CodesAsImages(model), seeds=np.array([1, 2, 2**63], np.uint64))


def test_torch_numbers_are_taken_as_the_numbers_they_hold():
    """`SamplingSettings(top_k=torch.tensor(5))` was refused as "top_k must be an integer >= 1, got tensor(5)", as
    were torch seeds, top_p, cfg_scale and per-depth tensors; a torch bool is still no top_k."""
    tensors = SamplingSettings(temperature=torch.tensor([1.0, 0.5, 0.75]), top_k=torch.tensor(5),
                               top_p=torch.tensor(0.5), cfg_scale=torch.tensor(2.0), seed=torch.tensor(3))  # fmt: skip
    plain = SamplingSettings(temperature=[1.0, 0.5, 0.75], top_k=5, top_p=0.5, cfg_scale=2.0, seed=3)
    assert tensors == plain and tensors.batch_key() == plain.batch_key()
    model, conditions = tiny_rq(), torch.tensor([1, 2])
    assert torch.equal(generate(model, conditions, tensors), generate(model, conditions, plain))
    with pytest.raises(ValueError, match=r"^top_k must be an integer >= 1 \(or None for no top-k\), got True$"):
        SamplingSettings(top_k=torch.tensor(True)).validate()


def test_an_unconditional_model_is_told_what_it_takes(tmp_path, capsys):
    """Prompts given to an unconditional model were answered "sample it with classes", which it then refused, and
    `--accept-rate` "sample it without classes", which the user had not given."""
    import vqar
    from conftest import TINY_RUN, run_cli
    from vqar.ar import GPT, GPTConfig
    from vqar.sampling import make_conditions
    from vqar.train.tokenizer import load_run_config

    with pytest.raises(ValueError, match=r"^this model is not text-conditioned: sample it without prompts$"):
        make_conditions(tiny_gpt(num_classes=0), prompts=["a seven"])
    with pytest.raises(ValueError, match=r"^this model is not text-conditioned: sample it with classes, not prompts$"):
        make_conditions(tiny_gpt(), prompts=["a seven"])
    tokenizer = vqar.Tokenizer(load_run_config("rqvae-mnist", [*TINY_RUN, "model.quantizer.kind=vq", "d=1"]).model)
    gpt = GPT(GPTConfig(vocab_size=64, code_shape=list(tokenizer.code_shape(32)), dim=32, n_layer=1, n_head=2,
                        num_classes=0))  # fmt: skip
    vqar.save_pretrained(gpt, tmp_path / "unconditional", tokenizer=tokenizer)
    code, err = run_cli(["sample", "--model", str(tmp_path / "unconditional"), "--accept-rate", "0.5",
                         "--classifier", "digits", "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and err == ("vqar: error: --accept-rate ranks samples by class, and this model is unconditional "
                                 "(it has no classes): leave it out\n"), err  # fmt: skip


def test_a_prompts_file_is_split_at_line_ends_alone_and_its_blank_lines_are_said(tmp_path, caplog):
    """`str.splitlines` also cut at U+2028 and form feeds: 3 lines by `wc -l` became 5 prompts without a word, where a
    --prompt holding U+2028 is refused. Skipped blank lines shifted label i from line i + 1 unsaid."""
    import logging

    from vqar.commands.common import read_lines
    from vqar.text.captions import check_one_line

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\u2028sitting on a mat\r\nb dog\x0cbarking\n\nc bird\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vqar"):
        lines = read_lines(str(prompts), "prompts")
    assert lines == ["a cat\u2028sitting on a mat", "b dog\x0cbarking", "c bird"]
    assert f"{prompts}: skipped 1 blank line; the prompts are its other 3 lines, in order" in caplog.text
    with pytest.raises(ValueError, match="holds a line break"):
        check_one_line(lines[0])  # what `vqar sample` then says of it, as of a --prompt
    caplog.clear()
    prompts.write_text("one\ntwo", encoding="utf-8")  # no final line end
    with caplog.at_level(logging.WARNING, logger="vqar"):
        assert read_lines(str(prompts), "prompts") == ["one", "two"]
    assert "skipped" not in caplog.text
