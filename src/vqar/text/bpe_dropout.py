"""BPE-Dropout (Provilkov, Emelianenko and Voita, "BPE-Dropout: Simple and Effective Subword Regularization",
ACL 2020): while a word is segmented, every merge that could apply is left out with probability p, and the
best-ranked of the rest is applied; the word is done when all are left out (or none applies). Words thus come in
several segmentations during training, and p = 0 is ordinary BPE.

Written here rather than taken from `tokenizers`, whose dropout draws from an unseeded random source of its own:
a training run could not be repeated. Here a `random.Random` the caller seeds makes every choice.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

END_OF_WORD = "</w>"


class BPEDropout:
    """Segments pre-tokenized words with the merges of a character-level BPE (word-final symbols end in "</w>")
    and dropout `p`. `merges`: the merge pairs, best first (merges.txt's order); `vocab`: symbol -> id."""

    def __init__(self, merges: Sequence[tuple[str, str]], vocab: Mapping[str, int], unk_id: int | None, p: float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"BPE dropout must be in [0, 1), got {p}")
        self.ranks = {pair: rank for rank, pair in reversed(list(enumerate(merges)))}  # a repeated pair: first rank
        self.vocab, self.unk_id, self.p = vocab, unk_id, p

    def word_ids(self, word: str, rng: random.Random) -> list[int]:
        if not word:
            return []
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            candidates = [(rank, at) for at, pair in enumerate(zip(symbols, symbols[1:], strict=False))
                          if (rank := self.ranks.get(pair)) is not None]  # fmt: skip
            kept = [candidate for candidate in candidates if rng.random() >= self.p] if self.p else candidates
            if not kept:
                break
            _, at = min(kept)  # the best merge; of its occurrences, the leftmost
            symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        ids = [self.vocab.get(symbol, self.unk_id) for symbol in symbols]
        return [i for i in ids if i is not None]  # a vocabulary without [UNK] leaves unknown characters out

    def encode(self, words: Sequence[str], rng: random.Random) -> list[int]:
        return [i for word in words for i in self.word_ids(word, rng)]


def read_merges(path: Path, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """The merge pairs of a `merges.txt` (a "#version" first line, then "left right" per line), best first."""
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (number == 1 and line.startswith("#")):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2 or pair[0] + pair[1] not in vocab:
            raise ValueError(f"{path}, line {number}: {line!r} is not a merge of two symbols of the vocabulary")
        merges.append(pair)
    return merges

