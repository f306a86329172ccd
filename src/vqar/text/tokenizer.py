"""Caption tokenizer: the character-level BPE of the RQ-Transformer's text-to-image release, on Hugging Face's
`tokenizers` (its `CharBPETokenizer`: BERT normalisation with lower-casing, words split on whitespace and
punctuation, sub-words ending in "</w>").

Captions become exactly `length` ids: lower-cased, truncated (with a warning outside training) and right-padded
with `[PAD]`. The release's vocabulary files (`bpe-16k-vocab.json` + `bpe-16k-merges.txt`, 16,384 entries,
`[PAD]` = 0, `[UNK]` = 1) load with `TextTokenizer.from_files`; `TextTokenizer.train` makes a new vocabulary
from captions with the same layout. BPE dropout ("BPE-Dropout", Provilkov et al., 2020) randomly skips merges
in training so the model sees several segmentations of a word; `encode(..., dropout=True)` applies it
(`vqar.text.bpe_dropout`, seeded from torch's global RNG).

Saved as a folder: `vocab.json`, `merges.txt` and `text_tokenizer.json` (length, dropout).
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import CharBPETokenizer

from vqar.text.bpe_dropout import BPEDropout, read_merges
from vqar.text.captions import check_one_line, is_unicode

log = logging.getLogger("vqar.text")

PAD, UNK = "[PAD]", "[UNK]"
SETTINGS_FILE = "text_tokenizer.json"
RELEASE_LENGTH = 32  # caption tokens of the RQ-Transformer's text-to-image models
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
# A learned vocabulary always holds the two special tokens and every character, alone and word-final ("z</w>").
MIN_VOCAB_SIZE = 2 + 2 * len(ALPHABET)


class TextTokenizer:
    def __init__(self, vocab_file: str | Path, merges_file: str | Path, length: int = RELEASE_LENGTH,
                 dropout: float | None = None):  # fmt: skip
        if length < 2:
            raise ValueError(f"the caption length must be >= 2 tokens, got {length}")
        if dropout is not None and not 0.0 < dropout < 1.0:
            raise ValueError(f"BPE dropout must be in (0, 1) or None, got {dropout}")
        self.vocab_file, self.merges_file = Path(vocab_file), Path(merges_file)
        for path in (self.vocab_file, self.merges_file):
            if not path.is_file():
                raise FileNotFoundError(f"BPE vocabulary file not found: {path}")
        self.length, self.dropout = length, dropout
        self._plain = self._build()
        self.pad_id = self._plain.token_to_id(PAD)
        if self.pad_id is None:
            raise ValueError(f"{self.vocab_file} has no {PAD} token; captions could not be padded")
        self._dropout = None
        if dropout:
            vocab, unk_id = self._plain.get_vocab(), self._plain.token_to_id(UNK)
            self._dropout = BPEDropout(read_merges(self.merges_file, vocab), vocab, unk_id, dropout)

    def _build(self) -> CharBPETokenizer:
        try:
            tokenizer = CharBPETokenizer.from_file(str(self.vocab_file), str(self.merges_file), unk_token=UNK,
                                                   lowercase=True)  # fmt: skip
        except Exception as err:  # the Rust side raises plain Exceptions for malformed files
            raise ValueError(f"cannot read the BPE files {self.vocab_file} / {self.merges_file}: {err}") from None
        tokenizer.add_special_tokens([PAD])
        tokenizer.enable_truncation(max_length=self.length)
        tokenizer.enable_padding(length=self.length, pad_id=tokenizer.token_to_id(PAD), pad_token=PAD)
        return tokenizer

    # ---------------------------------------------------------------- making and storing
    @classmethod
    def train(cls, captions: Iterable[str], folder: str | Path, *, vocab_size: int = 4096, length: int = RELEASE_LENGTH,
              dropout: float | None = 0.1, min_frequency: int = 2) -> TextTokenizer:  # fmt: skip
        """Learns a BPE vocabulary (at most `vocab_size` entries, `[PAD]` = 0 and `[UNK]` = 1 as in the release)
        from `captions` and saves the tokenizer to `folder`. Every printable ASCII character is in the vocabulary
        even when the captions lack it, so a prompt's new words are spelled out, never `[UNK]`."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"a caption vocabulary needs at least {MIN_VOCAB_SIZE} entries (every printable "
                             f"character, alone and word-final, and 2 special tokens), got {vocab_size}")  # fmt: skip
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = CharBPETokenizer(unk_token=UNK, lowercase=True)
        captions = [c for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            raise ValueError("no caption text to learn a BPE vocabulary from")
        # One extra line of single-character words puts each character's word-final form ("z</w>") in too.
        lines = [*captions, " ".join(ALPHABET)]
        tokenizer.train_from_iterator(
            lines,
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[PAD, UNK, *_word_final_forms(tokenizer, lines)],
            initial_alphabet=list(ALPHABET),
            show_progress=False,
        )
        tokenizer.save_model(str(folder))  # vocab.json + merges.txt
        made = cls(folder / "vocab.json", folder / "merges.txt", length, dropout)
        made.save(folder)
        return made

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for source, name in ((self.vocab_file, "vocab.json"), (self.merges_file, "merges.txt")):
            target = folder / name
            if source.resolve() != target.resolve():
                target.write_bytes(source.read_bytes())
        settings = {"format": "vqar-text-tokenizer", "length": self.length, "dropout": self.dropout}
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))

    @classmethod
    def load(cls, path: str | Path, length: int | None = None) -> TextTokenizer:
        """A folder saved by `save`, or a release's `*-vocab.json` file (its `*-merges.txt` beside it)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no text tokenizer at {path}: the path does not exist")
        if path.is_file() and path.name.endswith("vocab.json"):
            merges = path.with_name(path.name[: -len("vocab.json")] + "merges.txt")
            return cls(path, merges, length or RELEASE_LENGTH)
        settings_file = path / SETTINGS_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{path} holds no text tokenizer ({SETTINGS_FILE}, vocab.json, merges.txt)")
        settings = json.loads(settings_file.read_text())
        return cls(path / "vocab.json", path / "merges.txt", length or settings["length"], settings.get("dropout"))

    def with_length(self, length: int) -> TextTokenizer:
        """The same vocabulary making captions of `length` tokens (a model's text length)."""
        return type(self)(self.vocab_file, self.merges_file, length, self.dropout)

    # ---------------------------------------------------------------- using
    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size()

    def entries_differing_from(self, other: TextTokenizer) -> int:
        """How many vocabulary entries (text piece -> id) one of the two tokenizers has and the other has not:
        0 when both turn every caption into the same ids (their lengths and dropout aside)."""
        mine, theirs = set(self._plain.get_vocab().items()), set(other._plain.get_vocab().items())
        return len(mine ^ theirs)

    def encode(self, captions: str | Sequence[str], *, dropout: bool = False, strict: bool = True) -> torch.Tensor:
        """Ids (B, length) for a caption or a list of captions. `dropout` applies BPE dropout (training). With
        `strict` (prompts), an empty caption or one holding a line break is an error and a truncated one a warning;
        training data is neither checked nor reported."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if strict:
            for caption in captions:
                if not isinstance(caption, str) or not caption.strip():
                    raise ValueError(f"empty prompt {caption!r}: give some text (the model was trained on captions)")
                if not is_unicode(caption):  # bytes of another encoding, which the Rust tokenizer cannot take
                    raise ValueError(f"prompt {caption!r} is not UTF-8 text; give it in UTF-8")
                check_one_line(caption)  # prompt i is line i + 1 of prompts.txt: a line break would shift the rest
        if dropout and self._dropout is not None:
            return self._encode_with_dropout(captions)
        encodings = self._plain.encode_batch(captions)
        if strict:
            for caption, encoding in zip(captions, encodings, strict=True):
                if all(i == self.pad_id for i in encoding.ids):  # the null caption: guidance would have no condition
                    raise ValueError(f"prompt {caption!r} holds no text the caption tokenizer keeps (only control or "
                                     "invisible characters); give some words")  # fmt: skip
                unknown = _unknown_characters(caption, encoding, self._plain.token_to_id(UNK))
                if unknown:  # the model reads them all as one token: they do not steer it
                    log.warning("prompt %r: %s not in the caption tokenizer's vocabulary, read as %s",
                                _abridged(caption), ", ".join(map(repr, unknown)) + (" is" if len(unknown) == 1
                                                                                     else " are"), UNK)  # fmt: skip
                if encoding.overflowing:
                    log.warning("prompt %r (%d characters) is longer than the model's %d text tokens; truncated to "
                                "%r", _abridged(caption), len(caption), self.length,
                                self.decode(encoding.ids))  # fmt: skip
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def _encode_with_dropout(self, captions: list[str]) -> torch.Tensor:
        # One draw of the global RNG (which checkpoints save) seeds the batch's segmentations: a run repeats.
        rng = random.Random(int(torch.randint(2**62, ())))
        normalize, split = self._plain.normalizer.normalize_str, self._plain.pre_tokenizer.pre_tokenize_str
        ids = torch.full((len(captions), self.length), self.pad_id, dtype=torch.long)
        for row, caption in enumerate(captions):
            segmented = self._dropout.encode([word for word, _ in split(normalize(caption))], rng)[: self.length]
            ids[row, : len(segmented)] = torch.tensor(segmented, dtype=torch.long)
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of one row of ids, without padding."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._plain.decode([i for i in ids if i != self.pad_id])

    def null_caption(self, batch_size: int = 1) -> torch.Tensor:
        """The empty caption (all `[PAD]`): what caption dropout trains as "no condition"."""
        return torch.full((batch_size, self.length), self.pad_id, dtype=torch.long)


def _word_final_forms(tokenizer: CharBPETokenizer, lines: list[str]) -> list[str]:
    """The word-final form ("z</w>") of every character that ends a word of `lines`, in code point order. The
    trainer numbers these forms as it meets them in a hash map, in an order that changes from run to run, and its
    merges break ties between equal counts by those numbers: given first, as the trainer's reserved tokens (which
    it numbers in order after [PAD] and [UNK]), they make the same captions give the same vocabulary every time."""
    normalize, split = tokenizer.normalizer.normalize_str, tokenizer.pre_tokenizer.pre_tokenize_str
    last_characters = {word[-1] for line in lines for word, _ in split(normalize(line))}
    return [f"{character}</w>" for character in sorted(last_characters)]


def _unknown_characters(caption: str, encoding, unk_id: int | None) -> list[str]:
    """The characters of `caption` that its encoding reads as the unknown token, each once, in order."""
    if unk_id is None:
        return []
    spans = [caption[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
             if token == unk_id]  # fmt: skip
    return list(dict.fromkeys(char for span in spans for char in span if not char.isspace()))


def _abridged(text: str, limit: int = 80) -> str:
    """`text` cut to about `limit` characters for a message: a pasted page as a prompt is not echoed whole."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
