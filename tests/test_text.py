"""Text-to-image: the BPE caption tokenizer, caption files and stores, text-conditioned RQ-Transformer and GPT
(text head loss, soft targets, guidance), and the RQ release's text-conditioned format."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import vqar
from vqar.ar import GPT, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.ar.layers import run_blocks
from vqar.data import DataConfig
from vqar.data.codes import CodeDataset
from vqar.data.extraction import extract_codes
from vqar.sampling import SamplingSettings, generate
from vqar.testing import generate_uncached
from vqar.text import TextTokenizer, read_captions
from vqar.text.bpe_dropout import BPEDropout, read_merges
from vqar.text.captions import DIGIT_TEMPLATES, HELD_OUT_DIGIT_TEMPLATES, digit_captions
from vqar.train.text import text_loss

CAPTIONS = [
    "A photo of a cat sitting on a red sofa",
    "a painting of a dog in the snow",
    "The digit 7, handwritten",
    "two cats and a dog",
    "a red car parked near the sea",
] * 4


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, tmp_path_factory.mktemp("bpe"), vocab_size=400, length=10, min_frequency=1)


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_pads_and_lowercases(text_tokenizer):
    ids = text_tokenizer.encode(["A Painting of a DOG", "two cats"])
    assert ids.shape == (2, 10) and ids.dtype == torch.long
    assert text_tokenizer.pad_id == 0 and text_tokenizer.encode("x").shape == (1, 10)
    assert text_tokenizer.decode(ids[0]) == "a painting of a dog"
    assert text_tokenizer.decode(ids[1]) == "two cats"
    assert (ids[1] == 0).sum() > 0 and ids[1, -1] == 0  # right-padded with [PAD]
    assert torch.equal(text_tokenizer.null_caption(3), torch.zeros(3, 10, dtype=torch.long))
    unseen = text_tokenizer.encode("jqxz? 9")  # letters the captions lack are spelled out, never [UNK]
    assert 1 not in unseen.tolist()[0] and text_tokenizer.decode(unseen[0]) == "jqxz ? 9"


def test_prompt_characters_outside_the_vocabulary_are_named(text_tokenizer, caplog):
    """Characters the caption tokenizer does not know became [UNK] without a word ("七", "🎉", accented letters of
    a vocabulary learned from ASCII captions): the model reads them all alike, so they do not steer it."""
    with caplog.at_level(logging.WARNING, logger="vqar.text"):
        text_tokenizer.encode(["a cat", "a d\u00f6g \U0001f389 \u4e03\u4e03"])
    assert ("'a d\u00f6g \U0001f389 \u4e03\u4e03': '\u00f6', '\U0001f389', '\u4e03' are not in the caption "
            "tokenizer's vocabulary, read as [UNK]") in caplog.text
    assert "'a cat'" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqar.text"):  # training captions are not reported
        text_tokenizer.encode(["a d\u00f6g"], strict=False)
    assert not caplog.text


def test_long_prompts_are_truncated_with_a_warning_and_empty_ones_refused(text_tokenizer, caplog):
    long = "a photo of a cat sitting on a red sofa near the sea with two dogs and a car"
    with caplog.at_level(logging.WARNING, logger="vqar.text"):
        ids = text_tokenizer.encode(long)
    assert ids.shape == (1, 10) and (ids != 0).all()
    assert "longer than the model's 10 text tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqar.text"):  # a pasted page is not echoed whole
        text_tokenizer.encode("a cat " * 1000)
    assert "(6000 characters)" in caplog.text and len(caplog.text) < 400
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="empty prompt"):
            text_tokenizer.encode(["a cat", empty])
    with pytest.raises(ValueError, match="no text the caption tokenizer keeps"):  # it would be the null caption
        text_tokenizer.encode(["a cat", "\u200b\x01"])  # zero-width and control characters are dropped
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqar.text"):  # training data: no checks, no warnings
        text_tokenizer.encode([long, ""], strict=False)
    assert not caplog.text


def test_prompts_given_as_one_string_or_as_bytes_are_refused_naming_the_type(text_tokenizer):
    """`prompts="cat"` drew three images, of the prompts "c", "a" and "t", without a word."""
    from vqar.sampling import make_conditions

    cfg = GPTConfig(vocab_size=16, code_shape=[2, 2], dim=32, n_layer=1, n_head=2, num_classes=0, text_length=10,
                    text_vocab_size=text_tokenizer.vocab_size)  # fmt: skip
    model = GPT(cfg).attach(None, text_tokenizer)
    with pytest.raises(ValueError, match=r"prompts must be a list of strings, got the single string 'cat': give "
                                         r"\['cat'\] for one prompt"):  # fmt: skip
        make_conditions(model, prompts="cat")
    with pytest.raises(ValueError, match=r"prompts must be strings, got b'a cat' \(bytes\): decode them first"):
        make_conditions(model, prompts=b"a cat")
    with pytest.raises(ValueError, match=r"prompts must be strings, got 7 \(int\)$"):
        make_conditions(model, prompts=["a cat", 7])
    assert make_conditions(model, prompts=("a cat",), n_per_condition=2).prompts == ["a cat"]
    # The prompts of a samples .npz (a NumPy array of strings) were an "ambiguous truth value" error, a generator
    # an IndexError: both are read as the lists they hold.
    expected = make_conditions(model, prompts=["a cat", "a dog"])
    for given in (np.array(["a cat", "a dog"]), (p for p in ["a cat", "a dog"])):
        conditions = make_conditions(model, prompts=given)
        assert conditions.prompts == ["a cat", "a dog"] and torch.equal(conditions.rows, expected.rows)
    with pytest.raises(ValueError, match=r"give prompts"):
        make_conditions(model, prompts=np.array([], dtype=str))
    with pytest.raises(ValueError, match=r"prompts must be a list of strings, got 7 \(int\)$"):
        make_conditions(model, prompts=7)
    with pytest.raises(ValueError, match=r"prompts must be strings, got array\(\['a cat'\]"):  # a 2-D array: rows
        make_conditions(model, prompts=np.array([["a cat"]]))


def test_prompts_that_are_not_utf8_are_refused_in_one_line(text_tokenizer):
    # A command line in another encoding reaches Python as lone surrogates ("\udcff"), as does a JSON "\udcff".
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        text_tokenizer.encode(["a cat", "caf\udce9 au lait"])


@pytest.mark.parametrize("separator", ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
                                       "\u2028", "\u2029"])  # fmt: skip
def test_prompts_holding_a_line_break_are_refused_naming_them(text_tokenizer, separator):
    """prompts.txt gives prompt i on line i + 1: a prompt holding a line break (any that str.splitlines splits on)
    made it longer, and every later label named the wrong line."""
    from vqar.sampling import make_conditions

    for prompt in (f"a seven{separator}written neatly", f"a seven{separator}", f"{separator}a seven"):
        with pytest.raises(ValueError, match=r"^prompt .* holds a line break .*a prompt is one line") as err:
            text_tokenizer.encode(["the digit one", prompt])
        assert str(err.value).startswith(f"prompt {prompt!r} holds a line break ({separator[0]!r} at character ")
        assert "\n" not in str(err.value)  # one line
    cfg = GPTConfig(vocab_size=16, code_shape=[2, 2], dim=32, n_layer=1, n_head=2, num_classes=0, text_length=10,
                    text_vocab_size=text_tokenizer.vocab_size)  # fmt: skip
    model = GPT(cfg).attach(None, text_tokenizer)
    with pytest.raises(ValueError, match="holds a line break"):
        make_conditions(model, prompts=["the digit one", f"a seven{separator}written neatly"])
    text_tokenizer.encode([f"a seven{separator}written"], strict=False)  # training captions are not checked


def test_bpe_dropout_varies_segmentation_but_not_text(text_tokenizer):
    caption = "a red car"
    plain = text_tokenizer.encode(caption)
    segmentations = {tuple(text_tokenizer.encode(caption, dropout=True)[0].tolist()) for _ in range(30)}
    assert len(segmentations) > 1
    assert {text_tokenizer.decode(list(ids)) for ids in segmentations} == {caption}
    assert all(torch.equal(text_tokenizer.encode(caption), plain) for _ in range(5))  # no dropout outside training


def test_the_same_captions_learn_the_same_vocabulary_every_time(tmp_path):
    """The trainer numbers word-final forms ("a</w>") in hash-map order, new in every training, and breaks ties
    between merges by those numbers: unpinned, 8 trainings in 8 gave 8 different vocabularies."""
    captions = [*CAPTIONS, "naïve café", "日本 x-ray"]  # characters beyond ASCII end words too
    learned = set()
    for attempt in range(4):
        made = TextTokenizer.train(captions, tmp_path / str(attempt), vocab_size=170, length=10, min_frequency=1)
        learned.add((made.vocab_file.read_bytes(), made.merges_file.read_bytes()))
    assert len(learned) == 1
    vocabulary = json.loads(made.vocab_file.read_text())
    finals = sorted((form for form in vocabulary if len(form) == 5 and form.endswith("</w>")), key=vocabulary.get)
    assert (vocabulary["[PAD]"], vocabulary["[UNK]"], vocabulary[finals[0]]) == (0, 1, 2)
    assert finals == sorted(finals)  # numbered in code point order, after the two special tokens
    assert {"本</w>", "y</w>", "red</w>", "dog</w>"} <= vocabulary.keys()  # word-final forms, and merges learned
    assert made.decode(made.encode("a red dog, 日本")[0]) == "a red dog , 日 本"


def test_bpe_dropout_is_ordinary_bpe_at_zero_and_repeats_under_a_seed(text_tokenizer, tmp_path):
    vocab = text_tokenizer._plain.get_vocab()
    merges = read_merges(text_tokenizer.merges_file, vocab)
    plain = BPEDropout(merges, vocab, vocab["[UNK]"], p=0.0)
    prompts = ["A photo of a cat sitting on a red sofa", "two dogs, snow & sea!", "Crème brûlée 7x", "猫 on a sofa",
               "a painting of a catdog ☃ near the seashore", "   spaced   out   "]  # fmt: skip
    words = [[w for w, _ in text_tokenizer._plain.pre_tokenizer.pre_tokenize_str(
        text_tokenizer._plain.normalizer.normalize_str(prompt))] for prompt in prompts]  # fmt: skip
    expected = [[i for i in e.ids if i != text_tokenizer.pad_id] for e in text_tokenizer._plain.encode_batch(prompts)]
    assert [plain.encode(w, random.Random(0))[: text_tokenizer.length] for w in words] == expected
    assert vocab["[UNK]"] in expected[3] + expected[4]  # characters the captions never held

    torch.manual_seed(3)
    first = text_tokenizer.encode(prompts, dropout=True, strict=False)
    torch.manual_seed(3)
    assert torch.equal(text_tokenizer.encode(prompts, dropout=True, strict=False), first)
    assert not torch.equal(text_tokenizer.encode(prompts, dropout=True, strict=False), first)

    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nq\n")
    with pytest.raises(ValueError, match=r"line 4: 'q' is not a merge"):
        read_merges(tmp_path / "merges.txt", {"ca": 5, "cat</w>": 6})


def test_tokenizer_saves_and_loads_the_release_file_layout(text_tokenizer, tmp_path):
    text_tokenizer.save(tmp_path / "saved")
    again = TextTokenizer.load(tmp_path / "saved")
    assert (again.length, again.dropout, again.vocab_size) == (10, text_tokenizer.dropout, text_tokenizer.vocab_size)
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(text_tokenizer.vocab_file, release / "bpe-16k-vocab.json")
    shutil.copy(text_tokenizer.merges_file, release / "bpe-16k-merges.txt")
    from_release = TextTokenizer.load(release / "bpe-16k-vocab.json", length=32)
    assert from_release.length == 32 and from_release.pad_id == 0
    assert torch.equal(from_release.encode("two cats")[:, :10], text_tokenizer.encode("two cats"))
    with pytest.raises(FileNotFoundError, match="text tokenizer"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="no caption text"):
        TextTokenizer.train(["", "  "], tmp_path / "none")
    (release / "broken-vocab.json").write_text("{not json")
    (release / "broken-merges.txt").write_text("")
    with pytest.raises(ValueError, match="cannot read the BPE files"):
        TextTokenizer.load(release / "broken-vocab.json")


# ---------------------------------------------------------------- caption files and stores
def test_caption_files_count_and_skip_missing_captions(tmp_path, caplog):
    jsonl = tmp_path / "captions.jsonl"
    lines = [{"file": "a.png", "caption": "A  red car "}, {"file": "a.png", "caption": "a car"},
             {"file": "b.png", "caption": ""}, {"file": "c.png"}]  # fmt: skip
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="vqar.text"):
        table = read_captions(jsonl)
    assert table == {"a.png": ["A red car", "a car"]} and "2 line(s) with a missing or empty caption" in caplog.text
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("x/1.jpg\ta dog\nx/2.jpg\t\n")
    assert read_captions(tsv) == {"x/1.jpg": ["a dog"]}
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(ValueError, match="holds no captions"):
        read_captions(tmp_path / "empty.tsv")
    (tmp_path / "latin1.tsv").write_bytes("a.png\tun caf\u00e9\nb.png\tun th\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.tsv:1 is not UTF-8 text"):  # named, with its line
        read_captions(tmp_path / "latin1.tsv")
    (tmp_path / "escape.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"file": "b.png", "caption": '
                                           '"caf\\udce9"}\n')  # fmt: skip
    with pytest.raises(ValueError, match="escape.jsonl:2 holds a caption that is not Unicode text"):
        read_captions(tmp_path / "escape.jsonl")  # else extraction fails writing its caption shard
    (tmp_path / "windows.tsv").write_bytes(b"x/1.jpg\ta dog\r\n")
    assert read_captions(tmp_path / "windows.tsv") == {"x/1.jpg": ["a dog"]}
    (tmp_path / "captions.txt").write_text("a.png a car\n")
    with pytest.raises(ValueError, match=".jsonl or .tsv"):
        read_captions(tmp_path / "captions.txt")


def test_caption_files_say_what_they_used_to_drop_or_misread(tmp_path, caplog):
    """A number or an object as a caption was "a missing or empty caption"; a TSV's header line captioned an image
    called "file"; captions of files the folder lacks went unused unsaid; with both caption files in a folder the
    .jsonl was taken unsaid."""
    from vqar.data.datasets import ImageFolderDataset
    from vqar.text.captions import captions_for_files, find_caption_file

    jsonl = tmp_path / "several.jsonl"
    jsonl.write_text('{"file": "a.png", "caption": ["a red car", " a  car"]}\n{"file": "b.png", "caption": []}\n')
    with caplog.at_level(logging.WARNING, logger="vqar.text"):
        assert read_captions(jsonl) == {"a.png": ["a red car", "a car"]}
    assert "1 line(s) with a missing or empty caption" in caplog.text
    for value, said in [("7", "a number (7)"), ('{"en": "a car"}', "an object ({'en': 'a car'})"),
                        ('["a car", 7]', "a number (7)"), ("true", "true or false (True)")]:  # fmt: skip
        (tmp_path / "odd.jsonl").write_text(f'{{"file": "a.png", "caption": "ok"}}\n{{"file": "b.png", "caption": '
                                            f"{value}}}\n")  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f'odd.jsonl:2: "caption" holds {said}; a caption is a string')):
            read_captions(tmp_path / "odd.jsonl")

    tsv = tmp_path / "headed.tsv"
    tsv.write_text("File\tCaption\nx/1.jpg\ta dog\nx/2.jpg a cat\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqar.text"):
        assert read_captions(tsv) == {"x/1.jpg": ["a dog"]}
    assert "1 line(s) without a tab between the file name and the caption skipped" in caplog.text
    assert "missing or empty" not in caplog.text
    (tmp_path / "late.tsv").write_text("x/1.jpg\ta dog\nfile\tcaption\n")  # a header only on the first line
    assert read_captions(tmp_path / "late.tsv") == {"x/1.jpg": ["a dog"], "file": ["caption"]}

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    table = {"0.png": ["zero"], "1.png": ["one"], "9.png": ["nine"], "notes.txt": ["no image"]}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqar.text"):
        images = ImageFolderDataset(folder, 8, 1, max_images=2)  # a subset: its left-out images are no strangers
        captions_for_files(folder, images.files, table, "captions.jsonl", images.listed)
    assert "captions.jsonl captions 2 file(s) that are not among the images in" in caplog.text
    assert "such as '9.png'" in caplog.text

    (folder / "captions.jsonl").write_text('{"file": "0.png", "caption": "zero"}\n')
    assert find_caption_file(folder) == folder / "captions.jsonl"
    (folder / "captions.tsv").write_text("0.png\tnull\n")
    with pytest.raises(ValueError, match=re.escape(f"{folder} holds both captions.jsonl and captions.tsv: name the "
                                                   "one to use (--captions FILE, or data.captions=FILE)")):  # fmt: skip
        find_caption_file(folder)


def test_a_tsv_caption_file_with_more_columns_keeps_the_caption_alone(tmp_path, caplog):
    """`file<TAB>caption<TAB>url` lines stored "a black cat https://..." as the caption, and the header line
    `file<TAB>caption<TAB>url` was read as a caption of a file called 'file'."""
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("file\tcaption\turl\na.png\ta black cat\thttps://example.com/a.jpg\nb.png\ta dog\n")
    with caplog.at_level(logging.WARNING, logger="vqar"):
        assert read_captions(tsv) == {"a.png": ["a black cat"], "b.png": ["a dog"]}
    assert "1 line(s) with more columns than file<TAB>caption: the columns after the caption were left" in caplog.text


def test_an_invisible_caption_is_a_missing_one_and_another_key_is_named(tmp_path, caplog):
    """A caption of zero-width spaces was stored, and trained as the empty caption (guidance's null condition);
    a line naming its caption "captions" or "text" (a shard's keys) was counted as a missing caption."""
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"file": "a.png", "caption": "\\u200b\\u200b"}\n{"file": "b.png", "caption": "a cat"}\n')
    with caplog.at_level(logging.WARNING, logger="vqar"):
        assert read_captions(jsonl) == {"b.png": ["a cat"]}
    assert "1 line(s) with a missing or empty caption skipped" in caplog.text
    jsonl.write_text('{"file": "a.png", "captions": ["a cat"]}\n')
    with pytest.raises(ValueError, match=r'captions.jsonl:1 names its caption "captions"; a caption file\'s key is '
                                         r'"caption"'):  # fmt: skip
        read_captions(jsonl)


def test_a_tsv_written_with_quoting_is_said_to_be(tmp_path, caplog):
    """A .tsv from Python's csv module or pandas quotes a caption that holds a quote (or a tab, a line break): it
    was stored with its quotes, doubled inner quotes and all, without a word."""
    import csv

    with open(tmp_path / "captions.tsv", "w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows([["a.png", 'the sign says "seven"'], ["b.png", "a cat"]])
    with caplog.at_level(logging.WARNING, logger="vqar"):
        table = read_captions(tmp_path / "captions.tsv")
    assert table["b.png"] == ["a cat"]
    assert "1 caption(s) in double quotes, kept as written, quotes included" in caplog.text


def test_a_caption_line_with_an_empty_file_name_is_skipped_and_counted(tmp_path, caplog):
    """`\ta dog` captioned "." (the folder itself, as `Path("")` reads), and was then reported as a caption of a
    file that is not among the images."""
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("a.png\ta cat\n\ta dog\n \ta bird\n")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"file": "a.png", "caption": "a cat"}\n{"file": "", "caption": "a dog"}\n')
    for path, count in [(tsv, 2), (jsonl, 1)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vqar.text"):
            assert read_captions(path) == {"a.png": ["a cat"]}
        assert f"{count} line(s) with an empty file name skipped" in caplog.text


def test_digit_caption_phrasings_are_disjoint():
    assert digit_captions(7)[:2] == ["a handwritten seven", "the digit 7"]
    train = {c for d in range(10) for c in digit_captions(d)}
    held_out = {c for d in range(10) for c in digit_captions(d, HELD_OUT_DIGIT_TEMPLATES)}
    assert not train & held_out and len(train) == 10 * len(DIGIT_TEMPLATES)


def test_captioned_folder_becomes_a_text_store(tiny_pipeline, tmp_path, caplog):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(folder / "cats" / f"{i}.png")
    captions = [{"file": f"cats/{i}.png", "caption": f"a grey square number {i}"} for i in range(4)]
    captions.append({"file": "cats/0.png", "caption": "a dark square"})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    tokenizer = vqar.load_pretrained(tiny_pipeline / "tokenizer")
    with caplog.at_level(logging.WARNING):
        manifest = extract_codes(tokenizer, DataConfig(source=str(folder)), tmp_path / "codes")
    assert manifest["num_items"] == 4 and manifest["uncaptioned_images"] == 1 and "have no caption" in caplog.text
    store = CodeDataset(tmp_path / "codes")
    assert store.captions[0] == ["a grey square number 0", "a dark square"]
    assert store[3].captions == ["a grey square number 3"]
    (tmp_path / "codes" / "captions-00000.jsonl").write_text('[""]\n' * 4)
    with pytest.raises(ValueError, match="damaged"):
        CodeDataset(tmp_path / "codes")


def test_caption_file_naming_no_image_of_the_folder_is_said_to_before_encoding(tiny_pipeline, tmp_path, caplog):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32), 90 * i, dtype=np.uint8)).save(folder / "cats" / f"{i}.png")
    # Names relative to the folder's parent: the images are readable, only the captions do not match.
    lines = [{"file": f"photos/cats/{i}.png", "caption": "a grey square"} for i in range(2)]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    tokenizer = vqar.load_pretrained(tiny_pipeline / "tokenizer")
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="captions none of the 2 images"):
        extract_codes(tokenizer, DataConfig(source=str(folder)), tmp_path / "codes")
    assert "such as 'photos/cats/0.png'" in caplog.text and "(like 'cats/0.png')" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no store, no work folder
    # pack-shards packed them "with captions", every one empty, and extraction from its shards failed later
    from vqar.data.pack import pack_shards

    with pytest.raises(ValueError, match="captions none of the 2 images"):
        pack_shards(str(folder), tmp_path / "shards")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


# ---------------------------------------------------------------- models
def _rq_text_model(dropout: float = 0.1) -> RQTransformer:
    cfg = RQTransformerConfig(vocab_size=16, code_shape=[2, 2, 3], code_dim=8, dim=32, n_head=4, n_layer=2,
                              n_depth_layer=1, num_classes=0, text_length=6, text_vocab_size=40,
                              class_dropout_prob=dropout)  # fmt: skip
    return RQTransformer(cfg, code_embeddings=torch.randn(16, 8)).eval()


def test_rq_text_head_loss_and_soft_targets():
    model = _rq_text_model()
    codes, text = torch.randint(16, (3, 2, 2, 3)), torch.randint(1, 40, (3, 6))
    logits, text_logits = model(codes, text)
    assert logits.shape == (3, 2, 2, 3, 16) and text_logits.shape == (3, 5, 40)
    expected = F.cross_entropy(text_logits.reshape(-1, 40), text[:, 1:].reshape(-1))
    torch.testing.assert_close(text_loss(text_logits, text), expected)
    soft = model.soft_targets(codes, temperature=0.5)
    assert soft.shape == (3, 2, 2, 3, 16)
    torch.testing.assert_close(soft.sum(-1), torch.ones(3, 2, 2, 3))
    # the last depth's residual is exactly its own code vector, so a cold softmax puts all mass on that code
    assert torch.equal(model.soft_targets(codes, temperature=1e-4)[..., -1, :].argmax(-1), codes[..., -1])


def _greedy_choices(logits: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether every code is a largest logit of its row, up to float rounding (cached decoding and teacher forcing
    add the same numbers in other orders), so ties or near-ties of a random model cannot fail the check."""
    chosen = logits.gather(-1, codes[..., None]).squeeze(-1)
    return bool((logits.max(-1).values - chosen <= 1e-4).all())


def _guided_logits(model, codes: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Guidance computed here from two teacher-forced passes: the prompt, and the empty caption (all [PAD] = 0)
    written out by hand rather than asked of the model."""
    with torch.no_grad():
        conditional = model(codes, text).logits
        null = model(codes, torch.zeros_like(text)).logits
    return null + scale * (conditional - null)


def test_text_models_sample_with_guidance_and_cache():
    torch.manual_seed(0)
    rq = _rq_text_model()
    text = torch.randint(1, 40, (2, 6))
    guided = SamplingSettings(greedy=True, cfg_scale=2.0)
    cached = generate(rq, text, guided)
    assert torch.equal(generate_uncached(rq, text, guided), cached)
    # every choice (the first code included) is the argmax of the guided logits against the empty caption
    assert _greedy_choices(_guided_logits(rq, cached, text, 2.0), cached)
    with pytest.raises(ValueError, match="caption dropout"):
        generate(_rq_text_model(dropout=0.0), text, SamplingSettings(cfg_scale=2.0))
    cfg = GPTConfig(vocab_size=20, code_shape=[4, 4], dim=32, n_layer=2, n_head=2, num_classes=0, text_length=5,
                    text_vocab_size=30, class_dropout_prob=0.1)  # fmt: skip
    gpt = GPT(cfg).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # LlamaGen zero-initialises it: make greedy choices differ
    prompt = torch.randint(1, 30, (2, 5))
    assert gpt(torch.randint(20, (2, 4, 4)), prompt).logits.shape == (2, 4, 4, 20)
    codes = generate(gpt, prompt, SamplingSettings(greedy=True, cfg_scale=1.5))
    assert torch.equal(generate_uncached(gpt, prompt, SamplingSettings(greedy=True, cfg_scale=1.5)), codes)
    assert _greedy_choices(_guided_logits(gpt, codes, prompt, 1.5), codes)
    unguided = generate(gpt, prompt, SamplingSettings(greedy=True))
    assert _greedy_choices(gpt(unguided, prompt).logits, unguided)  # teacher forcing agrees with the sampler
    with pytest.raises(ValueError, match=r"shape \(B, 5\)"):
        generate(gpt, torch.zeros(2, 4, dtype=torch.long))
    npp = gpt(codes, prompt, patch_side=2).logits  # next patch prediction takes the caption prefix too
    assert npp.shape == (2, 4, 20)


# ---------------------------------------------------------------- the RQ release's text-to-image format
def test_text_conditioned_release_format_loads(tmp_path, text_tokenizer):
    """A release folder whose stage2 is text-conditioned (block_size_cond > 1, a cond_classifier), written by the
    test-only release writer: loaded, its outputs are those of the release's forward, assembled here by hand from
    the release's own weights and the loaded modules."""
    from test_interop_formats import tiny_rq_release

    release = tmp_path / "t2i"
    length, vocab = 10, text_tokenizer.vocab_size
    tiny_rq_release(release, text_length=length, text_vocab_size=vocab)
    config = yaml.safe_load((release / "stage2" / "config.yaml").read_text())
    assert (config["arch"]["block_size_cond"], config["arch"]["vocab_size_cond"]) == (length, vocab)
    state = torch.load(release / "stage2" / "model.pt", weights_only=True)["state_dict"]
    e = state["pos_emb_cond"].shape[-1]
    generator = torch.Generator().manual_seed(0)
    shutil.copy(text_tokenizer.vocab_file, release / "bpe-16k-vocab.json")
    shutil.copy(text_tokenizer.merges_file, release / "bpe-16k-merges.txt")

    model = vqar.load_pretrained(release)
    assert isinstance(model, RQTransformer) and model.cfg.text_length == length and not model.has_null_condition
    assert model.text_tokenizer is not None and model.text_tokenizer.length == length
    text = model.text_tokenizer.encode(["a painting of a dog", "two cats"])
    codes = torch.randint(model.cfg.vocab_size, (2, *model.code_shape), generator=generator)
    with torch.no_grad():
        logits, text_logits = model(codes, text)
        b, (h, w, d) = 2, model.code_shape
        emb = model.embed_codes(codes.view(b, h * w, d))
        prefix = F.embedding(text, state["cond_emb.weight"]) + state["pos_emb_cond"]
        body_in = torch.cat([prefix, model.spatial_input(emb).sum(2)[:, :-1] + state["pos_emb_hw"][:, : h * w - 1]], 1)
        latents = run_blocks(model.layers, body_in)
        spatial = latents[:, length - 1 :]
        depth_in = torch.cat([spatial[:, :, None], model.depth_input(emb.cumsum(2))[:, :, :-1]], 2) + state["pos_emb_d"]
        depth_out = run_blocks(model.depth_layers, depth_in.view(b * h * w, d, -1))
        expected = model.output(model.norm(depth_out)).view(b, h, w, d, -1)
        normed = F.layer_norm(latents[:, : length - 1], (e,), state["cond_classifier.layer_norm.weight"],
                              state["cond_classifier.layer_norm.bias"])  # fmt: skip
        expected_text = F.linear(normed, state["cond_classifier.linear.weight"], state["cond_classifier.linear.bias"])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_logits, expected_text, atol=1e-5, rtol=1e-5)
    sample = generate(model, text, SamplingSettings(greedy=True))
    assert torch.equal(generate_uncached(model, text, SamplingSettings(greedy=True)), sample)
    with pytest.raises(ValueError, match="caption dropout"):
        generate(model, text, SamplingSettings(cfg_scale=2.0))
