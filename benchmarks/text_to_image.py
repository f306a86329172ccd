"""Does a small text-conditioned RQ-Transformer follow its prompts? Trained on the bundled digits with generated
captions ("a handwritten seven", "the digit 7", ...), it is asked for each digit with phrasings it never saw in
training ("a picture of a handwritten seven", "number 7, written by hand", "a student wrote the digit seven"); the
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

from common import cached_code_store, float_at_least, print_table, run_script
from vqar.bundle import load
from vqar.commands.common import positive_int
from vqar.eval.digits import class_accuracy, digit_classifier
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.sampling.export import write_samples
from vqar.text.captions import DIGIT_TEMPLATES, HELD_OUT_DIGIT_TEMPLATES, digit_captions
from vqar.text.tokenizer import TextTokenizer
from vqar.train.ar import train_ar
from vqar.train.ar_config import load_run_config
from vqar.utils.device import cpu_kind


def prompt_accuracy(model, templates: list[str], per_prompt: int, cfg_scale: float, classifier, seed: int):
    prompts = [caption for digit in range(10) for caption in digit_captions(digit, templates)]
    digits = torch.arange(10).repeat_interleave(len(templates))
    conditions = make_conditions(model, prompts=prompts, n_per_condition=per_prompt)
    result = draw(model, conditions, SamplingSettings(cfg_scale=cfg_scale, seed=seed), batch_size=250)
    accuracy = class_accuracy(result.images, digits[result.labels], classifier)
    return accuracy, result


def caption_encoding_ms(folder: Path, repeats: int = 200) -> dict[str, float]:
    """The best time (ms) of encoding one training batch of captions with and without BPE-dropout, by a caption
    tokenizer learned as rq-mnist-text learns it (256 entries, 32 tokens, dropout 0.1): training's BPE-dropout
    is vqar's own Python (seeded, so that a run repeats), its plain encoding the `tokenizers` library's."""
    captions = [caption for digit in range(10) for caption in digit_captions(digit, DIGIT_TEMPLATES)]
    text = TextTokenizer.train(captions, folder, vocab_size=256, length=32, dropout=0.1)
    batch = [captions[i] for i in torch.randint(len(captions), (64,), generator=torch.Generator().manual_seed(0))]
    best = {"dropout": float("inf"), "plain": float("inf")}
    for _ in range(repeats):
        for kind in best:
            start = time.perf_counter()
            text.encode(batch, dropout=kind == "dropout", strict=False)
            best[kind] = min(best[kind], 1e3 * (time.perf_counter() - start))
    return best


def earlier_run(out: Path) -> dict | str:
    """What --reuse reads: the results.json of the run that trained OUT/ar, or why there is none to reuse."""
    if not (out / "ar" / "config.json").is_file():
        return f"no trained model in {out / 'ar'}; run without --reuse to train one"
    results = out / "results.json"
    try:
        earlier = json.loads(results.read_text())
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or not {"val_nll", "seconds"} <= earlier.keys():
        return (f"{results} is missing or holds no val_nll and seconds (the run that trained {out / 'ar'} did not "
                "finish); run without --reuse to train again")  # fmt: skip
    return earlier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps of the RQ-Transformer")
    parser.add_argument("--tokenizer-steps", type=positive_int, default=700)
    parser.add_argument("--per-prompt", type=positive_int, default=20, help="samples per prompt")
    parser.add_argument("--cfg", type=float_at_least(1), default=2.0, help="classifier-free guidance scale (>= 1)")
    parser.add_argument("--out", default="runs/bench/t2i")
    parser.add_argument("--reuse", action="store_true", help="evaluate the model already trained in --out/ar")
    parser.add_argument("--encoding-only", action="store_true",
                        help="only time the encoding of a training batch of captions, with and without BPE-dropout")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out)
    earlier = earlier_run(out) if args.reuse and not args.encoding_only else None
    if isinstance(earlier, str):
        parser.error(f"--reuse: {earlier}")
    if args.encoding_only:
        encoding = caption_encoding_ms(out / "encoding")
        print(f"CPU: {cpu_kind()}, {torch.get_num_threads()} threads")
        print(f"captions of a training batch (64): BPE-dropout {encoding['dropout']:.2f} ms, plain "
              f"{encoding['plain']:.2f} ms ({encoding['dropout'] / encoding['plain']:.1f}x)")
        return
    codes = cached_code_store(out, "rqvae-mnist", args.tokenizer_steps, captions="digits")
    if earlier is not None:
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
    print(f"\nrq-mnist-text (RQ-XS, {args.steps} steps, {seconds:.0f} s): val NLL {metrics['nll']:.4f}")
    encoding = caption_encoding_ms(out / "encoding")
    print(f"captions of a training batch (64): encoded with BPE-dropout in {encoding['dropout']:.2f} ms, without "
          f"in {encoding['plain']:.2f} ms; a training step took {1e3 * seconds / args.steps:.0f} ms\n")
    print_table(["prompts", "CFG", "samples", "digit named (classifier)"],
                [[r["prompts"], r["cfg"], r["n"], f"{100 * r['accuracy']:.1f}%"] for r in rows])
    unseen = max(r["accuracy"] for r in rows if r["prompts"] == "unseen phrasings")
    print(f"\nunseen phrasings: {100 * unseen:.1f}% (target >= 80%)")
    summary = {"steps": args.steps, "seconds": seconds, "val_nll": metrics["nll"], "rows": rows,
               "caption_encoding_ms": encoding}  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_script(main)
