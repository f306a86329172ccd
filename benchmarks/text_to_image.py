"""Does a small text-conditioned RQ-Transformer follow its prompts? Trained on the bundled digits with generated
captions ("a handwritten seven", "the digit 7", ...), it is asked for each digit with phrasings it never saw in
training ("a picture of a handwritten seven", "number 7, written by hand", "someone wrote the digit seven"); the
digit classifier says which digit each sample shows. Target: at least 80% of samples show the digit named.

    python benchmarks/text_to_image.py            # tokenizer (700 steps) + rq-mnist-text (2,000 steps), CPU

The tokenizer and code store are made once and reused from --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from common import cached_code_store, print_table
from vqar.bundle import load
from vqar.eval.digits import class_accuracy, digit_classifier
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.sampling.export import write_samples
from vqar.text.captions import DIGIT_TEMPLATES, HELD_OUT_DIGIT_TEMPLATES, digit_captions
from vqar.train.ar import load_run_config, train_ar


def prompt_accuracy(model, templates: list[str], per_prompt: int, cfg_scale: float, classifier, seed: int):
    prompts = [caption for digit in range(10) for caption in digit_captions(digit, templates)]
    digits = torch.arange(10).repeat_interleave(len(templates))
    conditions = make_conditions(model, prompts=prompts, n_per_condition=per_prompt)
    result = draw(model, conditions, SamplingSettings(cfg_scale=cfg_scale, seed=seed), batch_size=250)
    accuracy = class_accuracy(result.images, digits[result.labels], classifier)
    return accuracy, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps of the RQ-Transformer")
    parser.add_argument("--tokenizer-steps", type=int, default=700)
    parser.add_argument("--per-prompt", type=int, default=20, help="samples per prompt")
    parser.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--out", default="runs/bench/t2i")
    parser.add_argument("--reuse", action="store_true", help="evaluate the model already trained in --out/ar")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out)
    codes = cached_code_store(out, "rqvae-mnist", args.tokenizer_steps, captions="digits")
    if args.reuse and (out / "ar" / "config.json").is_file():
        earlier = json.loads((out / "results.json").read_text())
        metrics, seconds = {"nll": earlier["val_nll"]}, earlier["seconds"]
    else:
        start = time.perf_counter()
        metrics = train_ar(load_run_config("rq-mnist-text", [f"codes={codes}", f"steps={args.steps}"]), out / "ar",
                           overwrite=True)  # fmt: skip
        seconds = time.perf_counter() - start
    model = load(out / "ar")
    classifier = digit_classifier()
    rows = []
    for name, templates in (("training phrasings", DIGIT_TEMPLATES), ("unseen phrasings", HELD_OUT_DIGIT_TEMPLATES)):
        for scale in (1.0, args.cfg):
            accuracy, result = prompt_accuracy(model, templates, args.per_prompt, scale, classifier, seed=0)
            rows.append({"prompts": name, "cfg": scale, "n": len(result.images), "accuracy": accuracy})
            print(f"{name}, cfg {scale}: {100 * accuracy:.1f}% of {len(result.images)} samples show the digit named",
                  flush=True)  # fmt: skip
            if name == "unseen phrasings" and scale == args.cfg:
                write_samples(result, out / "samples_unseen", args.per_prompt, individual=False)
                for i, template in enumerate(templates):  # each phrasing on its own
                    mine = result.labels % len(templates) == i
                    digits = result.labels[mine] // len(templates)
                    share = class_accuracy(result.images[mine], digits, classifier)
                    print(f"  {template!r}: {100 * share:.1f}%", flush=True)
    print(f"\nrq-mnist-text (RQ-XS, {args.steps} steps, {seconds:.0f} s): val NLL {metrics['nll']:.4f}\n")
    print_table(["prompts", "CFG", "samples", "digit named (classifier)"],
                [[r["prompts"], r["cfg"], r["n"], f"{100 * r['accuracy']:.1f}%"] for r in rows])
    unseen = max(r["accuracy"] for r in rows if r["prompts"] == "unseen phrasings")
    print(f"\nunseen phrasings: {100 * unseen:.1f}% (target >= 80%)")
    summary = {"steps": args.steps, "seconds": seconds, "val_nll": metrics["nll"], "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
