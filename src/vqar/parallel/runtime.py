"""The process group of a torchrun launch and what trainers do with it: wrap, reduce, gather, shard state.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (a plain `python` or `vqar` call) `setup` returns a
single-process `Parallel` whose methods pass everything through untouched. CUDA runs use NCCL with one GPU per
process (cuda:LOCAL_RANK); CPU runs use gloo.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from vqar.parallel.config import DistConfig
from vqar.parallel.sync import any_rank

log = logging.getLogger("vqar.parallel")


class PeerFailed(RuntimeError):
    """Raised on the ranks that stop because another rank failed: that rank reports the reason, so the command line
    prints nothing more for these (every rank would otherwise add a line, or a traceback, to the one that matters)."""


class Terminated(BaseException):
    """SIGTERM to a single process (a scheduler's, `kill`): stopped as Ctrl-C stops it, with status 143 and the
    same one line (raised by the command line's handler, and by serve's once its server has stopped)."""


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def end_with_the_launcher() -> None:
    """Has Linux tell this torchrun worker when its launcher dies, and stops it with SIGTERM then. torchrun starts
    each worker in a session of its own, so a launcher killed outright (`kill -9`, the OOM killer) left its workers
    training on, orphaned and holding the run's lock; SIGTERM stops them as the launcher's own stop does (training
    writes a checkpoint first). Call it from the main thread, first thing."""
    if not launched_by_torchrun() or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = signal.signal(_LAUNCHER_GONE, _launcher_gone)
        if libc.prctl(_PR_SET_PDEATHSIG, _LAUNCHER_GONE, 0, 0, 0) != 0:
            signal.signal(_LAUNCHER_GONE, previous)
            return
    except (OSError, AttributeError, ValueError):  # no prctl, or not the main thread: as before, no notice
        return
    if os.getppid() != parent:  # the launcher died before the request: it will never be sent
        os.kill(os.getpid(), signal.SIGTERM)


def _launcher_gone(signum, frame) -> None:
    """The notice comes again each time the dying launcher's next thread ends (Linux hands an orphan to another
    thread of its parent first), and a second SIGTERM reads as a second Ctrl-C, which stops training at once: the
    notice is turned off and SIGTERM sent once."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
    os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A real-time signal no library here uses, caught by `_launcher_gone` (it is only asked for on Linux)
_LAUNCHER_GONE = getattr(signal, "SIGRTMIN", signal.SIGTERM) + 1


def launch_main() -> bool:
    """Whether this process speaks for the command: the only one, or rank 0 of a torchrun launch (read from the
    environment, so also before and after the process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def first_to_say(message: str, per_machine: bool = False) -> bool:
    """Whether this process is the first of its torchrun launch (with `per_machine`, of its machine: a mistake in
    the command line, which every machine's console should show) to report `message`. Ranks mostly fail alike (a
    missing file, a bad setting), and each printed the same line; another error on another rank is still said.
    The first to fail says it, whichever rank: the launcher stops the others, which may not get to say anything.
    Counted in the store of torchrun's agent, which outlives the process group (often gone by the time an error
    is printed); launched otherwise, or if that store does not answer, every process says its own."""
    if not launched_by_torchrun() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return True
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted launch says its errors again
    machine = f"machine-{os.environ.get('GROUP_RANK', '0')}/" if per_machine else ""
    key = f"vqar/said/{attempt}/{machine}{hashlib.sha1(message.encode('utf-8', 'replace')).hexdigest()}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=5), wait_for_workers=False)  # fmt: skip
        return store.add(key, 1) == 1
    except (KeyError, ValueError, RuntimeError):  # no address, or no answer (DistStoreError is a RuntimeError)
        return True


class SaidOncePerMachine(logging.Filter):
    """Lets a warning of the vqar loggers through on the first process of its machine to log it: every rank meets
    the same settings and the same checkpoint, and each printed the same line. A warning of one rank alone (a file
    of its share of the data) has its own words, so it is still said. A process that logs the same words again is
    counted on: its n-th time is said as long as no other process of the machine said them n times before."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not (record.name == "vqar" or record.name.startswith("vqar.")):
            return True
        message = record.getMessage()
        self.times[message] = self.times.get(message, 0) + 1
        return first_to_say(f"warning {self.times[message]}: {message}", per_machine=True)


def say_warnings_once_per_machine() -> None:
    """Has the console handlers (those of the root logger, which `logging.basicConfig` set up) print each vqar
    warning once per machine of a torchrun launch; the other ranks' info lines are off already (see `setup`).
    A handler filter, not a logger one: a logger's filter sees only its own records, not its children's."""
    if not launched_by_torchrun():
        return
    once = SaidOncePerMachine()
    for handler in logging.getLogger().handlers:
        # A second filter would claim each warning again and find it said: called twice, it would silence them
        if not any(isinstance(f, SaidOncePerMachine) for f in handler.filters):
            handler.addFilter(once)


def lost_a_peer(err: BaseException) -> bool:
    """Whether `err` is a collective of a torchrun launch that failed because another process is gone: torch's
    distributed errors, and gloo's plain RuntimeError when the peer's connection closes."""
    if not launched_by_torchrun():
        return False
    text = str(err)
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "gloo/transport/"))


@dataclass
class Parallel:
    """One process's view of the run. `world_size == 1` means no process group: every method is a no-op."""

    cfg: DistConfig = field(default_factory=DistConfig)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """FSDP: parameters live in shards, so every rank must take part in any forward pass or state gather."""
        return self.distributed and self.cfg.strategy == "fsdp"

    # ------------------------------------------------------------------ data
    def local_batch(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            raise ValueError(
                f"data.batch_size={global_batch} is the global batch and must divide evenly over the "
                f"{self.world_size} processes; use a multiple of {self.world_size}"
            )
        return global_batch // self.world_size

    # ------------------------------------------------------------------ models
    def wrap(self, module: nn.Module, units: list[nn.Module] | None = None) -> nn.Module:
        """The module to run training forward passes through: DDP's wrapper (which averages gradients during
        backward), the module itself sharded in place for FSDP, or the module unchanged in one process. `units`:
        the submodules FSDP shards one by one (default: every module held in a ModuleList, the transformer
        blocks). Create optimizers after this call: FSDP replaces the parameters by their shards."""
        if not self.distributed:
            return module
        if self.sharded:
            self._shard(module, units)
            return module
        if self.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            log.warning("batch norm statistics stay per process on CPU (SyncBatchNorm needs CUDA)")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # The CPU convolution backward gives a 1x1 kernel's gradient (out, in, 1, 1) strides such as (in, 1, in, in),
        # which differ from the parameter's (in, 1, 1, 1) only in size-1 dimensions: the same memory layout. DDP's
        # reducer compares strides literally and warns once per process that grads "do not match bucket view
        # strides"; the copy into the bucket is the one it makes anyway.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return nn.parallel.DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=self.cfg.find_unused_parameters
        )

    def _shard(self, module: nn.Module, units: list[nn.Module] | None) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self._mesh()
        # One unit per transformer block, then the root for the rest (embeddings, heads), so only one block's full
        # weights exist at a time.
        if units is None:
            units = [block for child in module.modules() if isinstance(child, nn.ModuleList) for block in child]
        for block in units:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        # Every nn.Linear on a (B, L, C) input returns a view, so FSDP2 warns on each unit's first forward that an
        # in-place op on it would skip the all-gather. The blocks add their outputs out of place, and the two-process
        # tests hold FSDP training equal to one process, so the warning is noise here (three per rank per run).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        kind = self.device.type
        if self.cfg.fsdp_mode == "full":
            return init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))
        shard = self.cfg.hybrid_shard_size or self.local_world_size
        if self.world_size % shard:
            raise ValueError(
                f"dist.hybrid_shard_size={shard} must divide the {self.world_size} processes for hybrid sharding"
            )
        return init_device_mesh(kind, (self.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))

    @contextlib.contextmanager
    def full_params(self, module: nn.Module) -> Iterator[nn.Module]:
        """Lets code outside `forward` (sampling, evaluation helpers) use a sharded root's own weights; its
        sharded blocks gather themselves when called. Every rank must run the same calls inside."""
        if not self.sharded:
            yield module
            return
        module.unshard()
        try:
            yield module
        finally:
            module.reshard()

    # ------------------------------------------------------------------ state
    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole, unsharded weights on CPU (on rank 0 only under FSDP; a collective there)."""
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not self.sharded:
            module.load_state_dict(state, strict=True)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Optimizer state in a form any world size can load: keyed by parameter name under FSDP."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"by_name": get_optimizer_state_dict(module, optimizer, options=options)}

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if "by_name" not in state:
            if not self.sharded:
                optimizer.load_state_dict(state)
                return
            # Written by one process or DDP: FSDP's loader places the full state on the shards by parameter name
            state = {"by_name": _by_name(module, optimizer, state)}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state["by_name"], options=options)

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one (so all ranks take the same branch)."""
        return any_rank(flag, self.device) if self.distributed else flag

    def main_prepares(self, prepare: Callable[[], object], what: str) -> None:
        """Runs `prepare` on rank 0 alone (write-locking and checking an output that every rank works for) and
        raises its OSError or ValueError on every rank: rank 0 its own, the others PeerFailed naming `what`, the
        output rank 0 could not prepare. A lock `prepare` enters into an ExitStack of the caller's is held there."""
        problem: Exception | None = None
        if self.is_main:
            try:
                prepare()
            except (OSError, ValueError) as err:  # FileExistsError, OutputLocked, PermissionError, a bad folder
                problem = err
        if self.any(problem is not None):
            raise problem or PeerFailed(f"rank 0 could not prepare {what}; see its error")

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Averages scalar metrics over ranks (every rank must pass the same keys)."""
        if not self.distributed or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return dict(zip(keys, (values / self.world_size).tolist(), strict=True))

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor] | None:
        """Concatenates every rank's tensors (along dim 0, in rank order) on rank 0; None on the other ranks.
        Goes through safetensors files in `folder` rather than a collective, so rank 0 alone holds the whole
        (possibly large) result in memory."""
        if not self.distributed:
            return tensors
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f".gather-rank{self.rank:05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(part))
        self.barrier()
        if not self.is_main:
            self.barrier()
            return None
        parts = [folder / f".gather-rank{r:05d}.safetensors" for r in range(self.world_size)]
        loaded = [load_file(str(p)) for p in parts]
        merged = {k: torch.cat([piece[k] for piece in loaded]) for k in tensors}
        for p in parts:
            p.unlink()
        self.barrier()
        return merged


def _by_name(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`optimizer.state_dict()` of an unsharded run (keyed by the parameter's position in the param groups) keyed by
    parameter name, as FSDP's full optimizer state is. The resuming optimizer is built by the same code, so its
    groups list the same parameters in the same order; under FSDP they are the shards `module` now holds."""
    names = {id(param): name for name, param in module.named_parameters()}
    saved = state["param_groups"]
    sizes = [len(group["params"]) for group in saved], [len(group["params"]) for group in optimizer.param_groups]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the checkpoint's optimizer holds parameter groups of {sizes[0]} parameters, this model's "
                         f"{sizes[1]}: it was written for another model")  # fmt: skip
    name_of = {index: names[id(param)] for old, new in zip(saved, optimizer.param_groups, strict=True)
               for index, param in zip(old["params"], new["params"], strict=True)}  # fmt: skip
    return {
        "state": {name_of[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]} for group in saved],
    }


def setup(cfg: DistConfig | None = None, device: torch.device | None = None) -> Parallel:
    """Joins the torchrun process group (creating it when needed) and picks this process's device."""
    cfg = cfg or DistConfig()
    device = device or torch.device("cpu")
    if not launched_by_torchrun():
        return Parallel(cfg=cfg, device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.timeout_minutes))
    par = Parallel(
        cfg=cfg,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        device=device,
        owns_group=owns,
    )
    if not par.is_main:  # one voice in the console: other ranks report only problems
        logging.getLogger("vqar").setLevel(logging.WARNING)
    return par


def teardown(par: Parallel, *, wait: bool = True) -> None:
    """Leaves the process group. With `wait`, every rank first meets at a barrier: a rank that destroys the group
    while another is still finishing its last collective can abort the whole launch (gloo, seen at exit)."""
    if par.owns_group and dist.is_initialized():
        if wait:
            with contextlib.suppress(RuntimeError):  # a peer that is already gone: leave anyway
                dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(cfg: DistConfig | None = None, device: torch.device | None = None) -> Iterator[Parallel]:
    """`setup`, then `teardown` at the end: after a barrier when the body finished, at once when it raised (the
    other ranks may never reach a barrier then)."""
    par = setup(cfg, device)
    try:
        yield par
    except BaseException:
        teardown(par, wait=False)
        raise
    teardown(par)
