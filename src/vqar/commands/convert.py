"""`vqar convert`: released checkpoints (and folders of older vqar versions) into vqar's model folder."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path

from vqar.commands.common import add_command, output_path

DETAILS = """Loads SRC with the official format's conventions and writes OUT_DIR/config.json + model.safetensors (and
OUT_DIR/tokenizer/, OUT_DIR/text_tokenizer/ for AR models that carry them); vqar.load_pretrained(OUT_DIR) reads it
back. Examples: `vqar convert imagenet_1.4B_rqvae_50e/stage2 out/rq-1.4b`, `vqar convert vq_ds16_c2i.pt out/vq16
--config VQ-16`, `vqar convert c2i_XL_384.pt out/gpt-xl --config '{"preset": "GPT-XL", "block_size": 576}'`,
`vqar convert var_d16.pth out/var-d16 --tokenizer vae_ch160v4096z32.pth` (the VQVAE is found when it lies
beside the transformer)."""


def run(args: argparse.Namespace) -> int:
    from vqar.bundle import is_model_folder
    from vqar.interop import load_pretrained
    from vqar.train.launch import check_not_a_companion
    from vqar.utils.io import check_folder_writable, check_replaceable

    out = Path(args.out_dir)
    # a training run, a code store, the tokenizer that made their codes or the user's own files are not written
    # over, --overwrite or not
    check_not_a_companion(out, "a model converted", option="OUT_DIR")
    check_replaceable(out, args.overwrite, "a vqar model folder", is_model_folder, option="OUT_DIR")
    check_folder_writable(out, option="OUT_DIR")  # before a load of gigabytes, not after
    _check_work_folder_writable(out.resolve())
    model = load_pretrained(args.src, config=args.config, ema=args.ema, tokenizer=args.tokenizer)
    _write_model(model, out.resolve())
    params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} ({params / 1e6:.2f}M parameters) written to {out}")
    print(next_steps(model, out))
    return 0


def _write_model(model, out: Path) -> None:
    """Writes `model` in a work folder, then puts it at `out` (new, empty, or a model folder it replaces): a write
    that fails or is interrupted (Ctrl-C, a full disk) leaves `out` as it was, never a model without its
    tokenizer/. The old model goes whole: an AR model's tokenizer/ left under a tokenizer converted over it would
    make the folder neither model."""
    from vqar.bundle import save_pretrained
    from vqar.train.resources import out_of_space
    from vqar.utils.io import remove_leftovers, replace_directory
    from vqar.utils.memory import human_bytes

    inside, home = _work_home(out)
    remove_leftovers(home, prefix=".convert.tmp-" if inside else f".{out.name}.tmp-")  # a killed convert's work
    work = home / (f".convert.tmp-{os.getpid()}" if inside else f".{out.name}.tmp-{os.getpid()}")
    need = _model_bytes(model)
    free = shutil.disk_usage(home).free
    if free < need:
        raise OSError(f"OUT_DIR {out}: only {human_bytes(free)} free on its disk, and the model needs about "
                      f"{human_bytes(need)}; free some space or write it elsewhere")  # fmt: skip
    try:
        try:
            save_pretrained(model, work)
        except Exception as err:  # safetensors reports a full disk as its own error type
            if not out_of_space(err):
                raise
            raise OSError(f"out of disk space writing the model to {out} ({human_bytes(shutil.disk_usage(home).free)} "
                          f"free, it needs about {human_bytes(need)}): {out} is as it was") from None  # fmt: skip
        if inside:
            _swap_entries(work, out)
        else:
            replace_directory(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _work_home(out: Path) -> tuple[bool, Path]:
    """Whether the shell is inside `out`, and the folder the model is first written in: `out` itself then (moving
    `out` aside would leave the shell in a removed folder), else the folder that holds `out`."""
    cwd = Path.cwd().resolve()
    inside = cwd == out or out in cwd.parents
    return inside, out if inside else out.parent


def _check_work_folder_writable(out: Path) -> None:
    """OSError naming the folder the model is first written in, where it cannot be written: an OUT_DIR that could
    be written, inside a folder that could not, passed the up-front check and failed after the whole load with a
    bare errno."""
    home = _work_home(out)[1]
    probe = home / f".write-test.tmp-{os.getpid()}"  # a temporary file's name (LEFTOVER), passed over by checks
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"OUT_DIR {out} cannot be written whole: the model is written in {home} first and then moved "
                      f"in place, and {home} cannot be written ({err.strerror or err})") from None  # fmt: skip


def _model_bytes(model) -> int:
    """About what the model's folder takes: its weights and buffers, and its tokenizer's (also when attached)."""
    from vqar.ar import ARModel
    from vqar.train.resources import module_bytes

    total = module_bytes(model)
    if isinstance(model, ARModel) and model.tokenizer is not None:  # attached, not a submodule: not in its weights
        total += module_bytes(model.tokenizer)
    return total + (1 << 20)  # and the configs, a MiB at most


def _swap_entries(built: Path, out: Path) -> None:
    """Replaces the model entries of `out` with those of `built` (a folder inside it) by renames only, putting the
    old ones back if a rename fails or is interrupted."""
    from vqar.bundle import MODEL_ENTRIES
    from vqar.utils.io import folder_entries, fsync_dir

    old = out / f".replaced.tmp-{os.getpid()}"
    old.mkdir()
    moved, placed = [], []
    try:
        for entry in sorted(MODEL_ENTRIES & set(folder_entries(out))):
            os.replace(out / entry, old / entry)
            moved.append(entry)
        for entry in folder_entries(built):
            os.replace(built / entry, out / entry)
            placed.append(entry)
    except BaseException:
        for entry in placed:
            os.replace(out / entry, built / entry)
        for entry in moved:
            os.replace(old / entry, out / entry)
        old.rmdir()
        raise
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def next_steps(model, out: Path) -> str:
    """The closing hint: what the converted model is used for (a stage-1 tokenizer is not sampled from)."""
    from vqar.ar import ARModel

    load = f"load it with vqar.load_pretrained({str(out)!r})"
    out = shlex.quote(str(out))  # a path with spaces, pasted back into a shell
    if isinstance(model, ARModel) and model.tokenizer is None:  # a var_d*.pth without its VQVAE beside it, say
        return (f"{load}; it was converted without the tokenizer that decodes its codes: give one to sample, "
                f"`vqar sample --model {out} --tokenizer TOKENIZER`, or convert again with --tokenizer")  # fmt: skip
    if isinstance(model, ARModel):
        return f"{load} or `vqar sample --model {out}`"
    uses = [f"vqar reconstruct --tokenizer {out} --out DIR IMAGE...", f"vqar eval rfid DATA --tokenizer {out}",
            f"vqar extract-codes --tokenizer {out} --data DATA --out CODES",
            f"vqar sample --model AR_MODEL --tokenizer {out}   (an AR model over its codes)"]
    return f"{load}; it is a stage-1 tokenizer, to use as in\n" + "\n".join(f"  {use}" for use in uses)


def register(sub: argparse._SubParsersAction) -> None:
    convert = add_command(sub, "convert", run, "convert released weights (RQ release, LlamaGen / NPP .pt, VAR .pth, "
                          "vqar 0.1 folders) to vqar's format", DETAILS)  # fmt: skip
    convert.add_argument("src", help="an RQ release folder (or its stage1/stage2, or model.pt), a LlamaGen .pt, a "
                         "VAR .pth (vae_ch160v4096z32.pth, var_d16.pth ...) or a vqar 0.1 folder")  # fmt: skip
    convert.add_argument("out_dir", type=output_path, help="the vqar model folder to write")
    convert.add_argument("--config", help="LlamaGen: a preset (VQ-16, VQ-8, GPT-B ... GPT-3B), a JSON file or an "
                         "inline JSON object; VAR's VQVAE: its scales ('{\"patch_nums\": [...]}'). Refused for the "
                         "other formats, which record their architecture")  # fmt: skip
    convert.add_argument("--tokenizer", help="the stage-1 model an AR model uses (any format load_pretrained reads); "
                         "refused for a stage-1 model")  # fmt: skip
    convert.add_argument("--ema", action="store_true", help="convert the EMA weights an RQ release or LlamaGen "
                         "checkpoint carries (refused for sources that hold one set of weights); the tokenizer's "
                         "too where its checkpoint carries them, else its one set")  # fmt: skip
    convert.add_argument("--overwrite", action="store_true", help="replace the model in OUT_DIR (only a model "
                         "folder: any other non-empty folder is refused)")
