"""The text side of stage-2 training, used when the code store holds captions (text-to-image).

Each step takes one of an image's captions at random, tokenizes it with BPE dropout, and replaces whole captions
by the empty one with the model's `class_dropout_prob` (what classifier-free guidance later uses as "no
condition"). An RQ-Transformer also predicts its caption with its text head (the weights of the two losses are
`loss.txt_weight` / `loss.img_weight`, see `vqar.train.ar_config.LossConfig`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vqar.bundle import TEXT_TOKENIZER_DIR
from vqar.data.codes import CodeDataset
from vqar.text.tokenizer import MIN_VOCAB_SIZE, RELEASE_LENGTH, TextTokenizer

log = logging.getLogger("vqar.train")


@dataclass
class TextConfig:
    """`tokenizer`: a saved text tokenizer folder or a release's `bpe-16k-vocab.json` (its merges file beside
    it); by default a BPE vocabulary of at most `vocab_size` entries is learned from the training captions (the
    model's text embedding has that many rows)."""

    length: int = RELEASE_LENGTH
    tokenizer: str | None = None
    vocab_size: int = 4096
    bpe_dropout: float | None = 0.1

    def validate(self) -> None:
        if self.length < 2:
            raise ValueError(f"text.length must be >= 2, got {self.length}")
        # else refused by the caption tokenizer once the run folder is made, naming no setting; it takes no 0 either
        if self.bpe_dropout is not None and not 0.0 < self.bpe_dropout < 1.0:
            raise ValueError(f"text.bpe_dropout must be in (0, 1), or null for none, got {self.bpe_dropout}")
        if self.tokenizer is None and self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"text.vocab_size must be >= {MIN_VOCAB_SIZE} (every printable character, alone and "
                             f"word-final, and 2 special tokens), got {self.vocab_size}")  # fmt: skip

    def model_fields(self) -> dict[str, int]:
        """The caption sizes a model trained with this config has: the given tokenizer's vocabulary and padding
        id, or those a learned vocabulary can have at most (`[PAD]` is id 0 in a learned one)."""
        if self.tokenizer:
            given = TextTokenizer.load(self.tokenizer, length=self.length)
            return {"text_length": self.length, "text_vocab_size": given.vocab_size, "text_pad_id": given.pad_id}
        return {"text_length": self.length, "text_vocab_size": self.vocab_size, "text_pad_id": 0}


def prepare_text_tokenizer(cfg: TextConfig, store: CodeDataset, train_items: list[int], run_dir: Path,
                           par) -> TextTokenizer:  # fmt: skip
    """The run's caption tokenizer, saved in `run_dir/text_tokenizer` (kept on resume). Rank 0 makes it, the
    other ranks wait and read the same files."""
    folder = Path(run_dir) / TEXT_TOKENIZER_DIR
    if par.is_main and not (folder / "vocab.json").is_file():
        if cfg.tokenizer:
            made = TextTokenizer.load(cfg.tokenizer, length=cfg.length)
            TextTokenizer(made.vocab_file, made.merges_file, cfg.length, cfg.bpe_dropout).save(folder)
        else:
            captions = (caption for i in train_items for caption in store.captions[i])
            TextTokenizer.train(captions, folder, vocab_size=cfg.vocab_size, length=cfg.length,
                                dropout=cfg.bpe_dropout)  # fmt: skip
    par.barrier()
    tokenizer = TextTokenizer.load(folder)
    if tokenizer.dropout != cfg.bpe_dropout:  # a rate given on --resume: it shapes training only, and may change
        tokenizer = TextTokenizer(tokenizer.vocab_file, tokenizer.merges_file, tokenizer.length, cfg.bpe_dropout)
    expected = cfg.model_fields()
    if tokenizer.vocab_size > expected["text_vocab_size"] or tokenizer.pad_id != expected["text_pad_id"]:
        raise ValueError(f"{folder} holds a tokenizer of {tokenizer.vocab_size} text tokens padded with id "
                         f"{tokenizer.pad_id}; the model embeds {expected['text_vocab_size']} padded with "
                         f"{expected['text_pad_id']}")  # fmt: skip
    if tokenizer.length != cfg.length:
        raise ValueError(f"{folder} holds a tokenizer for {tokenizer.length} text tokens, but text.length={cfg.length}")
    if not cfg.tokenizer and tokenizer.vocab_size * 2 < cfg.vocab_size and par.is_main:
        # The embedding (and an RQ-Transformer's text head) is sized by the setting; the rows past the learned
        # vocabulary are never seen, and only cost memory and time.
        log.warning("the training captions gave a vocabulary of %d entries, far fewer than text.vocab_size=%d that "
                    "the model's text embedding is sized by; text.vocab_size=%d would do", tokenizer.vocab_size,
                    cfg.vocab_size, tokenizer.vocab_size)  # fmt: skip
    return tokenizer


def caption_ids(tokenizer: TextTokenizer, captions: list[list[str]], *, train: bool, drop_prob: float,
                device: torch.device) -> torch.Tensor:  # fmt: skip
    """(B, length) ids: a random caption of each item with BPE dropout in training (its first one otherwise),
    and whole captions dropped to the empty caption with probability `drop_prob` (training only). The global
    RNG, which checkpoints save, makes the choices."""
    if train:
        picks = [options[int(torch.randint(len(options), ()))] for options in captions]
    else:
        picks = [options[0] for options in captions]
    ids = tokenizer.encode(picks, dropout=train, strict=False)
    if train and drop_prob > 0:
        dropped = torch.rand(len(ids)) < drop_prob
        ids[dropped] = tokenizer.pad_id
    return ids.to(device)


def text_loss(text_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The text head's cross-entropy: position t predicts caption token t + 1, padding included (as the
    release trains it)."""
    return F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
