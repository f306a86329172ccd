"""The `vqar` command line: help, presets, config errors, train -> reconstruct."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_RUN, run_cli
from vqar.cli import main
from vqar.data import load_mnist_digits


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("train", "reconstruct", "presets", "config", "examples"):
        assert word in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "d=<depth>" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["vqar.cli", "vqar"])  # `python -m vqar` was "cannot be directly executed"
def test_console_script_is_installed(module):
    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("vqar ")
    bad = subprocess.run([sys.executable, "-m", module, "presets", "nothing"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'nothing'" in bad.stderr and "Traceback" not in bad.stderr


# Ctrl-C while the program imports torch: the signal comes at once, before the import, deterministically.
_CTRL_C_WHILE_STARTING = """
import os, signal, sys
sys.argv[0] = "/somewhere/bin/vqar"
import vqar.utils.startup  # installs the handler: argv[0] names the program
{ctrl_c}
from vqar.cli import main
sys.exit(main(["presets"]))
"""


@pytest.mark.parametrize("swallowed", [False, True])
def test_ctrl_c_while_the_program_starts_is_one_line(swallowed):
    """A Ctrl-C in the first seconds of `vqar ...` (torch importing) printed a traceback through torch's import.
    torch's C extension imports numpy and carries on past any exception of it, which swallowed the exit: the
    program then said it was interrupted and did the work anyway."""
    ctrl_c = "os.kill(os.getpid(), signal.SIGINT)"
    if swallowed:  # as torch's import of numpy does
        ctrl_c = f"try:\n    {ctrl_c}\nexcept BaseException:\n    print('swallowed', file=sys.stderr)"
    result = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_STARTING.format(ctrl_c=ctrl_c)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 130 and result.stdout == "", result
    said = "vqar: interrupted while starting; nothing was done\n"
    assert result.stderr == (said + "swallowed\n" if swallowed else said)


def test_only_the_program_quiets_ctrl_c_a_program_importing_vqar_keeps_its_own():
    from vqar.utils.startup import started_as_the_program

    assert started_as_the_program(["/venv/bin/vqar", "sample"], ["/venv/bin/python", "/venv/bin/vqar", "sample"])
    for orig_argv in (["python", "-m", "vqar", "presets"], ["python", "-u", "-m", "vqar"], ["py", "-m", "vqar.cli"]):
        assert started_as_the_program(["-m"], orig_argv), orig_argv
    for argv, orig_argv in ((["train.py"], ["python", "train.py"]), (["-m"], ["python", "-m", "pytest", "vqar"]),
                            (["-c"], ["python", "-c", "import vqar"]),
                            (["vqar.py"], ["python", "vqar.py"])):  # fmt: skip
        assert not started_as_the_program(argv, orig_argv), orig_argv
    check = "import signal, vqar; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0
    program = "import signal, sys; sys.argv[0] = 'vqar'; import vqar; " + check.split("; ", 1)[1]
    assert subprocess.run([sys.executable, "-c", program], capture_output=True).returncode == 1  # its handler


_EXIT_PROBE = """
import atexit, sys
class Teardown:
    def __del__(self):
        print("interpreter teardown")
keep = Teardown()
atexit.register(print, "exit handlers ran")
sys.argv = ["vqar", "presets", "tokenizer"]
from vqar.cli import entry
entry()
"""


@pytest.mark.parametrize("torchrun", [False, True], ids=["plain", "torchrun"])
def test_the_program_ends_with_its_status_and_a_torchrun_worker_skips_the_teardown(torchrun):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    if torchrun:
        env |= {"RANK": "1", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-c", _EXIT_PROBE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "rqvae-mnist" in done.stdout and "exit handlers ran" in lines  # printed output and handlers survive
    assert ("interpreter teardown" in lines) is not torchrun


def test_presets_and_config(capsys):
    assert main(["presets"]) == 0
    assert "rqvae-mnist" in capsys.readouterr().out
    assert main(["config", "tokenizer", "rqvae-mnist", "d=2", "c=128"]) == 0
    text = capsys.readouterr().out
    assert "depth: 2" in text and "codebook_size: 128" in text


def test_config_errors_exit_2_with_the_reason(capsys):
    assert main(["config", "tokenizer", "rqvae-mnist", "model.quantizer.deph=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.quantizer.deph'" in err and "depth" in err
    assert main(["train", "tokenizer", "--out", "/nonexistent/run", "--resume"]) == 2
    assert "run.yaml not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("group", "preset", "override"),
    [
        ("tokenizer", "rqvae-mnist", "model.conv.ch_mult=[1,2"),
        ("tokenizer", "rqvae-mnist", "train.betas=[0.9"),
        ("tokenizer", "rqvae-mnist", "data.source={a"),
        ("ar", "rq-mnist", "arch=[1"),  # read before the schema is known (it picks the architecture)
    ],
)
def test_an_override_yaml_cannot_read_is_one_line_naming_it(group, preset, override, capsys):
    assert main(["config", group, preset, override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"override {override!r}" in err and "Traceback" not in err, err


def test_resuming_a_run_of_the_other_stage_says_which_stage_it_is(tmp_path, capsys):
    from omegaconf import OmegaConf

    from vqar.configs import to_yaml
    from vqar.train import ar_config as ar
    from vqar.train import tokenizer

    runs = {"tokenizer": tmp_path / "tok", "ar": tmp_path / "ar"}
    for run in runs.values():
        run.mkdir()
    # The run.yaml each stage writes (the AR one less the fields its code store gives): all a resume reads first.
    (runs["tokenizer"] / "run.yaml").write_text(to_yaml(tokenizer.load_run_config("rqvae-mnist", TINY_RUN)))
    (runs["ar"] / "run.yaml").write_text(OmegaConf.to_yaml(ar.compose_run_config("rq-mnist", [])[0]))
    for group, other, preset, message in [
        ("ar", "tokenizer", [], "is a tokenizer run, not an AR run"),
        ("ar", "tokenizer", ["rq-mnist"], "is a tokenizer run, not an AR run"),
        ("tokenizer", "ar", [], "is an AR run, not a tokenizer run"),
    ]:
        assert main(["train", group, *preset, "--resume", "--out", str(runs[other])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{runs[other]} {message}" in err, err
        assert f"vqar train {other} --resume" in err
        assert [p.name for p in runs[other].iterdir()] == ["run.yaml"]


def test_resume_that_changes_the_architecture_names_it_not_the_run_yaml(tmp_path, capsys):
    """run.yaml holds the model fields of its family (a VIM's mlp_ratio): read under another arch it would be
    refused as if the file were wrong ("run.yaml: unknown config key 'model.mlp_ratio'")."""
    from omegaconf import OmegaConf

    from vqar.train import ar_config as ar

    run = tmp_path / "vim"
    run.mkdir()
    (run / "run.yaml").write_text(OmegaConf.to_yaml(ar.compose_run_config("vim-mnist", [])[0]))
    assert main(["train", "ar", "--resume", "--out", str(run), "arch=gpt", "size=GPT-XS"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the run in {run} trains arch=vim" in err and "leave arch=gpt out" in err, err
    assert "unknown config key" not in err
    assert [p.name for p in run.iterdir()] == ["run.yaml"]
    # A preset of another family with --resume asked for codes= (which that preset leaves unset).
    assert main(["train", "ar", "--resume", "gpt-mnist", "--out", str(run)]) == 2
    assert capsys.readouterr().err == (f"vqar: error: --resume: the run in {run} trains arch=vim, and preset "
                                       "'gpt-mnist' is for arch=gpt; leave the preset out (the run's run.yaml is "
                                       "used) or give one for arch=vim (vim-imagenet, vim-mnist)\n")  # fmt: skip
    assert [p.name for p in run.iterdir()] == ["run.yaml"]


def _interrupted(monkeypatch, module, name):
    """Ctrl-C pressed while `module.name` runs."""

    def press_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, press_ctrl_c)


def test_ctrl_c_mentions_a_checkpoint_only_for_a_training_run_that_has_one(tmp_path, capsys, monkeypatch):
    import vqar.commands.sample
    import vqar.train.tokenizer
    from vqar.train.checkpoint import checkpoint_dir

    _interrupted(monkeypatch, vqar.commands.sample, "load_ar_model")
    assert main(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "samples")]) == 130
    assert capsys.readouterr().err == "vqar: interrupted\n"
    monkeypatch.setenv("RANK", "1")  # Ctrl-C reaches every process of a torchrun launch: rank 0 alone says so
    assert main(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "samples")]) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    _interrupted(monkeypatch, vqar.train.tokenizer, "train_tokenizer")
    train = ["train", "tokenizer", "rqvae-mnist", "--out", str(tmp_path / "run")]
    assert main(train) == 130
    assert capsys.readouterr().err == "vqar: interrupted before the first checkpoint was written\n"
    (checkpoint_dir(tmp_path / "run") / "step-0000040").mkdir(parents=True)
    assert main(train) == 130
    assert "the newest checkpoint (step 40) is intact (resume with --resume)" in capsys.readouterr().err


def test_sigterm_stops_a_command_as_ctrl_c_does_leaving_no_empty_folder(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM (or `kill`) ended `vqar sample` outright: no word, and the empty --out folders it had
    made stayed. It now stops as Ctrl-C does (status 128 + SIGTERM), and the caller's handler comes back."""
    import vqar.utils.io

    made = vqar.utils.io.check_folder_writable

    def made_then_terminated(*args, **kwargs):
        made(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(vqar.utils.io, "check_folder_writable", made_then_terminated)
    callers = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "new" / "samples"
    assert main(["sample", "--model", str(tmp_path / "model"), "--out", str(out)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "vqar: interrupted\n"
    assert not (tmp_path / "new").exists() and signal.getsignal(signal.SIGTERM) is callers


def test_a_mistake_in_the_command_is_said_once_per_machine_under_torchrun(tmp_path, capsys, monkeypatch):
    """Every process of a launch reads the same command line and configuration and fails alike: the first of each
    machine to find the mistake says why, in one line (`first_to_say`, per machine), and the others stop with the
    same status without repeating it. (LOCAL_RANK 0 alone said it, and a launch said nothing when another rank found
    it first: tests/test_distributed.py shows that with real processes.)"""
    import vqar.cli

    bad_option = ["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "samples"), "--top-k"]
    bad_key = ["train", "tokenizer", "rqvae-mnist", "stepz=3", "--out", str(tmp_path / "run")]
    for first, lines in ((False, 0), (True, 1)):
        asked: list[bool] = []

        def first_to_say(said, per_machine=False, asked=asked, first=first):
            asked.append(per_machine)
            return first

        monkeypatch.setattr(vqar.cli, "first_to_say", first_to_say)
        with pytest.raises(SystemExit) as stopped:
            main(bad_option)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("vqar sample: error: argument --top-k") == lines, err
        assert main(bad_key) == 2
        err = capsys.readouterr().err
        assert err.count("vqar: error: unknown config key 'stepz'") == lines and err.count("\n") == lines, err
        assert asked == [True, True]


def test_a_run_stopped_by_a_signal_under_torchrun_says_so_once(tmp_path, capsys, monkeypatch, caplog):
    """Every rank stops at the step the ranks agreed on and rank 0 writes the checkpoint: rank 0's lines are the
    only ones (each rank printed both before)."""
    import signal
    import types

    import vqar.train.tokenizer
    from vqar.parallel import Parallel
    from vqar.train.errors import TrainingInterrupted
    from vqar.train.loop import Trainer

    def stopped(*args, **kwargs):
        raise TrainingInterrupted("stopped by SIGTERM at step 4; resume with --resume", signal.SIGTERM)

    monkeypatch.setattr(vqar.train.tokenizer, "train_tokenizer", stopped)
    train = ["train", "tokenizer", "rqvae-mnist", "--out", str(tmp_path / "run")]
    for rank, expected in (("1", ""), ("0", "vqar: stopped by SIGTERM at step 4; resume with --resume; the checkpoint "
                                             "of that step is written\n")):  # fmt: skip
        monkeypatch.setenv("RANK", rank)
        assert main(train) == 143  # 128 + SIGTERM, as for a process the signal ended (a scheduler's preemption)
        assert capsys.readouterr().err == expected, rank
    for rank, said in ((1, False), (0, True)):
        trainer = types.SimpleNamespace(stop_signal=signal.SIGTERM, step=4, save=lambda: None,
                                        par=Parallel(rank=rank, world_size=2))  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vqar"), pytest.raises(TrainingInterrupted) as stop:
            Trainer._stop_on_signal(trainer)
        assert ("SIGTERM received: writing a checkpoint at step 4" in caplog.text) is said, rank
        assert stop.value.signal_number == signal.SIGTERM  # the exit status the command gives: 143


def test_a_rank_stopped_by_another_ranks_failure_prints_nothing(tmp_path, capsys, monkeypatch):
    """Under torchrun rank 0 refuses an --out (a run there already, a lock held) and says why in one line; rank 1
    learns of it through a collective and stops without a line, or a traceback, of its own."""
    import contextlib

    from vqar.parallel import Parallel
    from vqar.train import launch

    class Rank1(Parallel):
        def any(self, flag: bool) -> bool:
            return True  # rank 0 failed

    @contextlib.contextmanager
    def joined(cfg, device):
        yield Rank1(rank=1, world_size=2)

    monkeypatch.setattr(launch, "joined", joined)
    monkeypatch.setenv("RANK", "1")  # a rank that tidies nothing up: rank 0 owns --out
    assert main(["train", "tokenizer", "rqvae-mnist", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ""
    assert list(tmp_path.iterdir()) == []


def test_train_then_reconstruct(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "tokenizer", "rqvae-mnist", *TINY_RUN, "steps=6", "--out", str(run_dir)]) == 0
    assert "recon_grid.png" in capsys.readouterr().out
    assert main(["train", "tokenizer", "rqvae-mnist", *TINY_RUN, "steps=6", "--out", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err
    # Resume from the saved run.yaml and train further.
    assert main(["train", "tokenizer", "--resume", "steps=8", "--out", str(run_dir)]) == 0
    assert (run_dir / "checkpoints" / "step-0000008").is_dir()

    digits, _ = load_mnist_digits()
    good = tmp_path / "digit.png"
    Image.fromarray(digits[7]).resize((40, 40)).convert("RGB").save(good)  # resized and gray-converted on load
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out_dir = tmp_path / "recon"
    code = main(
        ["reconstruct", "--tokenizer", str(run_dir), str(good), str(bad), "--out", str(out_dir), "--depth", "2"]
    )
    assert code == 1  # one file failed, the other was still written
    captured = capsys.readouterr()
    assert "digit.png: PSNR" in captured.out
    picture = Image.open(out_dir / "digit_recon.png")
    assert picture.size == (2 * 32 + 3 * 2, 32 + 2 * 2)
    assert not (out_dir / "bad_recon.png").exists()
    again = ["reconstruct", "--tokenizer", str(run_dir), str(good), "--out", str(out_dir), "--overwrite"]
    assert main([*again, "--size", "30"]) == 2
    assert "multiple of" in capsys.readouterr().err


@pytest.mark.parametrize("release", ["rqvae/stage1", "var/vae.pth", "llamagen/vq_ckpt.pt"])
def test_reconstruct_reads_a_releases_own_tokenizer(fixtures, release, tmp_path, capsys):
    """The README's `vqar reconstruct --tokenizer imagenet_1.4B_rqvae_50e/stage1` (and VAR's VQVAE .pth, LlamaGen's
    .pt with --config): the official files, not only vqar folders. The fixture's VQVAE has 5 scales, not the
    release's 10: given by --config."""
    import json

    digits, _ = load_mnist_digits()
    picture = tmp_path / "digit.png"
    Image.fromarray(digits[3]).convert("RGB").save(picture)
    config = ["--config", str(fixtures / "llamagen" / "vq_config.json")] if release.endswith(".pt") else []
    if release.endswith(".pth"):
        scales = json.loads((fixtures / "var" / "config.json").read_text())["var"]["patch_nums"]
        config = ["--config", json.dumps({"patch_nums": scales})]
    out = tmp_path / "recon"
    assert main(["reconstruct", "--tokenizer", str(fixtures / release), *config, str(picture), "--out", str(out)]) == 0
    assert "digit.png: PSNR" in capsys.readouterr().out
    assert (out / "digit_recon.png").is_file()


def test_reconstructions_of_inputs_with_the_same_name_go_to_files_of_their_own(tmp_path):
    """`a_2.png a.png a.jpg`: the third was numbered a_2 and its reconstruction replaced the first one's, while the
    run said 3 of 3 were reconstructed."""
    from vqar.eval.reconstruct import _targets

    names = ["a_2", "a", "a", "A", "a", "x/a"]
    targets = _targets([(tmp_path / f"{name}.png", name) for name in names], tmp_path)
    assert [t.relative_to(tmp_path).as_posix() for t in targets] == [
        "a_2_recon.png", "a_recon.png", "a_3_recon.png", "A_4_recon.png", "a_5_recon.png", "x/a_recon.png"]
    assert len({str(t).casefold() for t in targets}) == len(names)  # one file each, on a case-blind disk too


def test_reconstruct_takes_folders_and_keeps_their_relative_paths(fixtures, tmp_path, capsys):
    digits, _ = load_mnist_digits()
    folder = tmp_path / "pictures"
    for sub, index in (("a", 1), ("b", 2)):
        (folder / sub).mkdir(parents=True)
        Image.fromarray(digits[index]).save(folder / sub / "digit.png")  # the same name in two subfolders
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "single.png"
    Image.fromarray(digits[3]).save(single)
    out = tmp_path / "recon"
    assert main(["reconstruct", "--tokenizer", str(fixtures / "rqvae/stage1"), str(folder), str(single),
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a/digit_recon.png", "b/digit_recon.png", "single_recon.png"]  # fmt: skip
    assert "3 of 3 images reconstructed: mean PSNR" in printed

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main(["reconstruct", "--tokenizer", str(fixtures / "rqvae/stage1"), str(empty),
                 "--out", str(tmp_path / "recon2")]) == 2  # fmt: skip
    assert f"{empty} contains no image files" in capsys.readouterr().err
    assert not (tmp_path / "recon2").exists()

    taken = tmp_path / "notes.md"  # an --out that is a file: said before the tokenizer is loaded (it is none here)
    taken.write_text("mine")
    assert main(["reconstruct", "--tokenizer", str(tmp_path / "no-tokenizer"), str(single), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--out {taken} is a file; give a folder" in err and taken.read_text() == "mine", err
    # A --size no image can be made at: said once, not as every image being unreadable (a "decompression bomb").
    assert main(["reconstruct", "--tokenizer", str(tmp_path / "no-tokenizer"), str(single), "--size", "20000",
                 "--out", str(tmp_path / "recon3")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("vqar: error: --size 20000 asks for 20000x20000 images, over the") and "single" not in err
    assert not (tmp_path / "recon3").exists()
    # The same of extract-codes' --image-size, which resized every image (0.6 GB, 2 s each) to call it unreadable
    for size in ("24000", str(10**400)):
        assert main(["extract-codes", "--tokenizer", str(tmp_path / "no-tokenizer"), "--data", str(tmp_path),
                     "--image-size", size, "--out", str(tmp_path / "codes")]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith(f"vqar: error: --image-size {size} asks for {size}x{size} images, over the"), err
    assert not (tmp_path / "codes").exists()
    # A path that does not exist (a typo) was "vqar: no such image" with status 1, after the tokenizer loaded.
    assert main(["reconstruct", "--tokenizer", str(tmp_path / "no-tokenizer"), str(single), str(tmp_path / "typo.png"),
                 "--out", str(tmp_path / "recon4")]) == 2  # fmt: skip
    assert capsys.readouterr().err == f"vqar: error: no such image: {tmp_path / 'typo.png'}\n"
    assert not (tmp_path / "recon4").exists()


def test_reconstruct_writes_over_a_picture_already_there_only_with_overwrite(fixtures, tmp_path, capsys):
    """A file of the user's at `NAME_recon.png` in --out was written over without a word."""
    digits, _ = load_mnist_digits()
    picture = tmp_path / "0.png"
    Image.fromarray(digits[3]).save(picture)
    out = tmp_path / "recon"
    out.mkdir()
    (out / "0_recon.png").write_text("my notes")
    command = ["reconstruct", "--tokenizer", str(fixtures / "rqvae/stage1"), str(picture), "--out", str(out)]
    assert main(command) == 2
    assert capsys.readouterr().err == (f"vqar: error: {out / '0_recon.png'} exists: pass --overwrite to replace the "
                                       "reconstructions there, or choose another --out\n")  # fmt: skip
    assert (out / "0_recon.png").read_text() == "my notes"
    assert main([*command, "--overwrite"]) == 0
    assert (out / "0_recon.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")  # the reconstruction now


@pytest.mark.parametrize(
    "args",
    [
        ["sample", "--model", "runs/ar", "stray", "--out", "samples"],  # was a TypeError traceback
        ["sample", "--model", "runs/ar", "--out", "samples", "top_k=5"],
        ["serve", "--model", "runs/ar", "stray"],
        ["convert", "a.pt", "out", "stray"],
        ["reconstruct", "--tokenizer", "runs/rq", "a.png", "--out", "recon", "--stray"],
        ["extract-codes", "--tokenizer", "runs/rq", "--data", "mnist", "--out", "codes", "stray"],
        ["eval", "fid", "samples", "--ref", "ref.npz", "stray"],
        ["eval", "linear-probe", "mnist", "--model", "runs/ar", "--layer", "1", "stray"],
        ["demo", "--out", "runs/demo", "stray"],
        ["presets", "tokenizer", "stray"],
        ["pack-shards", "mnist", "--out", "shards", "stray"],
    ],
)
def test_stray_words_are_one_line_errors(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    stray = next(word for word in args if "stray" in word or "=" in word)
    command = " ".join(args[:2] if args[0] == "eval" else args[:1])
    # the command's own parser says it, pointing at the help that lists that command's options
    assert err.startswith(f"vqar {command}: error: unrecognized arguments: "), err
    assert stray in err and err.rstrip().endswith(f"(see vqar {command} --help)"), err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_commands_with_overrides_take_them_after_their_options(capsys):
    assert main(["config", "tokenizer", "rqvae-mnist", "d=2", "c=128"]) == 0
    assert "depth: 2" in capsys.readouterr().out
    assert main(["train", "tokenizer", "rqvae-mnist", "stray", "--out", "/nonexistent/run"]) == 2
    assert "overrides are key=value pairs, got 'stray'" in capsys.readouterr().err


def test_a_preset_given_as_a_path_that_is_no_yaml_file_is_named_as_such(tmp_path, capsys, monkeypatch):
    """`vqar config tokenizer ./notes` and a folder were "no tokenizer preset named './notes'"; a folder that shares
    a preset's name (a run trained into ./rqvae-mnist) still leaves the preset meant. The usage line wrote its list
    twice ("PRESET [key=value ...] [PRESET [key=value ...] ...]")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").write_text("steps: 3\n")
    (tmp_path / "rqvae-mnist").mkdir()
    for given, what in (("./notes", "a file without a .yaml or .yml suffix"), (str(tmp_path), "a folder"),
                        ("gone/x", "no file")):  # fmt: skip
        assert main(["config", "tokenizer", given]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vqar: error: {given} is {what}: a preset is a name (") and "rqvae-mnist" in err, err
    assert main(["config", "tokenizer", "rqvae-mnist"]) == 0 and "arch: conv" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    assert capsys.readouterr().out.startswith("usage: vqar config [-h] {tokenizer,ar} PRESET [key=value ...]\n")


@pytest.mark.parametrize(("group", "preset", "overrides", "shown", "said"), [
    ("tokenizer", "rqvae-mnist", ["steps=7", "train.steps=9"], "steps: 9", "train.steps is given twice (steps=7, then "
                                                                           "train.steps=9)"),
    ("tokenizer", "rqvae-mnist", ["d=2", "model.quantizer.depth=3"], "depth: 3",
     "model.quantizer.depth is given twice (d=2, then model.quantizer.depth=3)"),
    ("tokenizer", "rqvae-mnist", ["c=64", "c=128", "c=128"], "codebook_size: 128", "model.quantizer.codebook_size is "
                                                                                   "given twice (c=64, then c=128)"),
    ("ar", "gpt-mnist", ["lr=1e-3", "train.lr=2e-3"], "lr: 0.002", "train.lr is given twice (lr=1e-3, then "
                                                                   "train.lr=2e-3)"),
])  # fmt: skip
def test_a_setting_given_twice_says_which_value_is_used(capsys, caplog, group, preset, overrides, shown, said):
    """`steps=7 train.steps=9` trained 9 steps and `d=2 model.quantizer.depth=3` a depth of 3, without a word. A
    change appended to a long command is still taken; the same value twice is no change and says nothing."""
    with caplog.at_level(logging.WARNING, logger="vqar"):
        assert main(["config", group, preset, *overrides]) == 0
    assert shown in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records] == [f"{said}: the last is used"]


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("f=0", "f (the latent stride) must be a power of 2 from 1 to 256, got 0"),  # was "math domain error"
        ("f=-4", "f (the latent stride) must be a power of 2 from 1 to 256, got -4"),
        ("f=512", "f (the latent stride) must be a power of 2 from 1 to 256, got 512"),
        ("image_size=0", "image_size must be a positive multiple of f=32, got 0"),
        ("ch=0", "ch (the tokenizer's base width) must be a positive multiple of 32 (its GroupNorm groups), got 0"),
        ("ch=8", "must be a positive multiple of 32 (its GroupNorm groups), got 8"),  # said norm_groups=, no key here
        # each was "need d >= 1, c >= 2, batch_size >= 1, loops >= 1 and warmup >= 0", naming none of them
        ("d=0", "d must be at least 1, got 0"),
        ("c=1", "c must be at least 2, got 1"),
        ("batch_size=-1", "batch_size must be at least 1, got -1"),
        ("loops=0", "loops must be at least 1, got 0"),
        ("warmup=-1", "warmup must be at least 0, got -1"),
    ],
)
def test_bench_sample_names_a_bad_setting(setting, words, capsys):
    assert main(["bench", "sample", "model=RQ-XS", setting, "--device", "cpu"]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("top_p=2", "top_p must be in (0, 1]"),
        ("top_k=0", "top_k must be an integer >= 1"),
        ("cfg_scale=0.5", "cfg_scale must be a finite number >= 1"),
        ("window=0", "speculative_window must be an integer >= 1"),
        ("window=8", "window=8 sets speculative decoding's window, which is off: add speculative=true"),  # was taken
        # were killed by the kernel (image_size=4096) or hung (batch_size=100000000) without a word
        ("image_size=4096", "decoding 100 images of 4096x4096 at once (batch_size; tokenizer width ch=128) would "
                            "need about 3.1 TB of memory"),
        ("batch_size=100000000", "decoding 100000000 images of 256x256 at once (batch_size; tokenizer width ch=128) "
                                 "would need about 11.9 PB of memory"),
    ],
)
def test_bench_sample_refuses_a_bad_sampling_setting_before_building_the_model(setting, words, capsys, monkeypatch):
    import vqar.eval.throughput

    def build_models(*args):  # the default RQ-1.4B took a minute and 6 GB before the setting was read
        raise AssertionError("the model was built before the sampling settings were checked")

    monkeypatch.setattr(vqar.eval.throughput, "build_models", build_models)
    assert main(["bench", "sample", setting, "--device", "cpu"]) == 2
    assert words in capsys.readouterr().err


def test_a_codes_path_that_does_not_exist_is_called_missing_and_a_store_is_no_tokenizer(tmp_path, capsys,
                                                                                     tokenizer_folder):  # fmt: skip
    """`codes=nonexist` was "nonexist is not a code store (no manifest.json)"; a code store given to extract-codes as
    --tokenizer was "not a vqar model folder: ... a training run writes one at its first checkpoint"."""
    code, err = run_cli(["train", "ar", "rq-mnist", f"codes={tmp_path / 'nonexist'}", "--out", str(tmp_path / "a")],
                        capsys)  # fmt: skip
    assert code == 2 and err == (f"vqar: error: data.codes: no code store at {tmp_path / 'nonexist'}: the path does "
                                 "not exist (make one with `vqar extract-codes --out`)\n"), err  # fmt: skip
    store = tmp_path / "codes"
    images = tmp_path / "digits.npz"
    np.savez(images, arr_0=np.zeros((4, 32, 32), np.uint8))
    extract = ["extract-codes", "--data", str(images)]
    assert run_cli([*extract, "--tokenizer", str(tokenizer_folder), "--out", str(store)], capsys)[0] == 0
    assert (store / "tokenizer" / "config.json").is_file()  # a vqar folder is copied as it is
    code, err = run_cli([*extract, "--tokenizer", str(store), "--out", str(tmp_path / "c2")], capsys)
    assert code == 2 and f"{store} is a code store (made by `vqar extract-codes`), not a model" in err, err


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`vqar releases | head -1` ended in "vqar: error: [Errno 32] Broken pipe"."""
    command = subprocess.Popen([sys.executable, "-m", "vqar.cli", "releases", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    command.stdout.close()  # before vqar has written anything: its first write finds no reader
    assert command.wait(timeout=120) == 141  # as a process ended by SIGPIPE, which shells know
    assert command.stderr.read() == b""
