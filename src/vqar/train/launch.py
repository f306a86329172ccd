"""Starting a training run in one process or as one rank of a torchrun launch."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from vqar.bundle import MODEL_ENTRIES, TEXT_TOKENIZER_DIR, TEXT_TOKENIZER_FILES, TOKENIZER_DIR, is_model_folder
from vqar.data.codes import is_code_store
from vqar.data.pack import is_shard_folder
from vqar.parallel import DistConfig, Parallel, joined
from vqar.train.checkpoint import (
    DAMAGED,
    RUN_FILES,
    discard_set_aside_run,
    has_run,
    prepare_run_dir,
    put_back_a_killed_overwrites_run,
    restore_set_aside_run,
)
from vqar.utils.device import resolve_device
from vqar.utils.io import LEFTOVER, describe_entries, folder_entries, write_lock
from vqar.utils.runs import run_kind, run_of_checkpoints

log = logging.getLogger("vqar.train")
KINDS = {"tokenizer": "a tokenizer", "ar": "an AR model"}  # what each kind of run trains


@contextlib.contextmanager
def distributed_run(
    cfg: DistConfig, device: str, run_dir: str | Path, resume: bool, overwrite: bool, kind: str
) -> Iterator[tuple[Parallel, Path]]:
    """Joins the process group (when launched by torchrun), lets rank 0 lock, check and prepare the run directory
    for a run of `kind` (a key of KINDS), and leaves the group at the end. A problem on rank 0 (an existing run,
    another process training into the same folder) is raised on every rank. The lock (`write_lock`: `.RUN.lock`
    beside the run directory, so --overwrite never removes it and it is never part of the run) is held until the
    body ends."""
    run_dir = Path(run_dir)
    with joined(cfg, resolve_device(device)) as par, contextlib.ExitStack() as held:

        def prepare() -> None:  # the lock is taken before --overwrite deletes anything
            held.enter_context(write_lock(run_dir))
            put_back_a_killed_overwrites_run(run_dir)  # before the folder is judged: it holds that run
            check_run_folder(run_dir, kind, resume=resume, overwrite=overwrite)
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)

        par.main_prepares(prepare, f"the run directory {run_dir}")
        try:
            yield par, run_dir
        except BaseException:
            if par.is_main and restore_set_aside_run(run_dir):
                log.warning("the run stopped before its first checkpoint: %s holds the run --overwrite was to replace "
                            "again", run_dir)  # fmt: skip
            raise
        if par.is_main:
            discard_set_aside_run(run_dir)


def check_not_a_companion(out: Path, written: str = "a run trained", option: str = "--out") -> None:
    """Refuses the tokenizer/ of a code store, a training run or a model folder as an output: a tokenizer trained
    (or a model converted) there replaced the one that made their codes, and what was trained or sampled from them
    then decoded through another tokenizer without a word, or did not load. `written`: what the output would be."""
    parent = Path(out).absolute().parent
    if Path(out).name != TOKENIZER_DIR:
        return
    for what, is_it in (("code store", is_code_store), ("training run", has_run), ("model", is_model_folder)):
        if is_it(parent):
            raise FileExistsError(f"{out} is the tokenizer of the {what} {parent}, which made its codes: {written} "
                                  f"there would replace it (not even --overwrite writes into it); choose another "
                                  f"{option}")  # fmt: skip


# What a run (or a model it exports) keeps in the folders of RUN_FILES that --overwrite empties; the trackers'
# folders are theirs to lay out. `_files_a_run_never_writes` holds the rest back from deletion.
_RUN_FOLDER_ENTRIES = {
    "checkpoints": re.compile(rf"^(?:step-\d+|{DAMAGED}|best\.json)$"),
    TOKENIZER_DIR: re.compile(f"^(?:{'|'.join(map(re.escape, sorted(MODEL_ENTRIES)))})$"),
    TEXT_TOKENIZER_DIR: re.compile(f"^(?:{'|'.join(map(re.escape, sorted(TEXT_TOKENIZER_FILES)))})$"),
}


def _files_a_run_never_writes(run_dir: Path) -> list[Path]:
    """The entries of a folder that holds no run which --overwrite would delete along with a folder of RUN_FILES
    but no run writes there: a user's notes in checkpoints/ or tokenizer/. A killed writer's leftovers are the
    run's own."""
    foreign = []
    for name, allowed in _RUN_FOLDER_ENTRIES.items():
        folder = run_dir / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        foreign += [folder / entry for entry in folder_entries(folder)
                    if not allowed.match(entry) and not LEFTOVER.match(entry)]  # fmt: skip
    return foreign


def check_run_folder(run_dir: Path, kind: str, *, resume: bool, overwrite: bool) -> None:
    """Refuses a run directory that a run of `kind` would write over unasked. A run of the same kind is
    `prepare_run_dir`'s to judge (--resume or --overwrite); a run of the other kind, or a non-empty folder that
    holds no run (an exported model, your files), needs --overwrite, which removes only what a run writes
    (`RUN_FILES`: a model there is replaced, other files are kept). A code store or a folder of shards is never
    trained into: the run would mix with the data, and the data's --overwrite would then delete the run. Nor is a
    run's checkpoints folder: a checkpoint's run.yaml made it look like a run to resume, which rewrote the files
    its manifest vouches for (the run then set it aside as damaged), and --overwrite would empty it."""
    owner = run_of_checkpoints(run_dir)
    if owner is not None:
        raise FileExistsError(f"{run_dir} lies inside the checkpoints of the run {owner}: to continue that run, pass "
                              f"--resume --out {owner}; to start a new one, choose an --out outside it")  # fmt: skip
    check_not_a_companion(run_dir)
    entries = folder_entries(run_dir)
    if not entries:
        return
    if has_run(run_dir):
        found = run_kind(run_dir)
        if found in (None, kind):
            return
        mismatch = f"{run_dir} holds the training run of {KINDS[found]}, not of {KINDS[kind]}"
        if resume:
            raise FileExistsError(f"--resume: {mismatch}")
        if not overwrite:
            raise FileExistsError(f"{mismatch}; pass --overwrite to replace it, or choose another --out")
    else:
        for data, is_data in (("a code store", is_code_store), ("a folder of tar shards", is_shard_folder)):
            if is_data(run_dir):
                raise FileExistsError(f"{run_dir} is {data}, which a training run is never written into (not even "
                                      "with --overwrite); choose another --out")  # fmt: skip
        if not overwrite:
            raise FileExistsError(f"{run_dir} is not a training run (it holds {describe_entries(entries)}); pass "
                                  "--overwrite to train into it (a model there is replaced, other files are kept), "
                                  "or choose another --out")  # fmt: skip
        foreign = _files_a_run_never_writes(run_dir)
        if foreign:
            raise FileExistsError(f"{foreign[0]} is not a file a training run writes, and --overwrite would delete "
                                  f"it with {foreign[0].parent.name}/; move it, or choose another --out")  # fmt: skip
    nested = [run_dir / name for name in RUN_FILES if has_run(run_dir / name)]
    if nested:  # e.g. a folder that holds a tokenizer run in tokenizer/: --overwrite would delete that run
        raise FileExistsError(f"{nested[0]} holds a training run of its own, which --overwrite would delete; move it "
                              "or choose another --out")  # fmt: skip
