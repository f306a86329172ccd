"""The digit classifier behind the demo's class-accuracy check."""

from __future__ import annotations

import torch

from vqar.eval.digits import CACHE_NAME, class_accuracy, digit_classifier
from vqar.eval.digits import real_digits as held_out_digits


def test_classifier_recognises_held_out_digits(classifier_cache):
    model = digit_classifier(classifier_cache)
    images, labels = held_out_digits("val")
    assert class_accuracy(images, labels, model) >= 0.97
    # Wrong labels are not recognised: the metric can fail.
    assert class_accuracy(images, (labels + 1) % 10, model) < 0.05
    # Noise is not a confident digit of every class.
    noise = torch.rand(100, 1, 32, 32) * 2 - 1
    assert class_accuracy(noise, torch.arange(100) % 10, model) < 0.5


def test_damaged_cache_is_retrained(classifier_cache, tmp_path, caplog):
    (tmp_path / CACHE_NAME).write_bytes(b"garbage")
    model = digit_classifier(tmp_path)
    assert "unreadable" in caplog.text
    images, labels = held_out_digits("val")
    assert class_accuracy(images[:200], labels[:200], model) >= 0.95
