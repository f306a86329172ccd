"""Data-parallel and sharded training under torchrun (DDP, FSDP full / hybrid shard), kept apart from the models.

Trainers ask a `Parallel` (made once per process by `setup`) to wrap their modules, reduce metrics and gather
full state dicts; in a single process every call is a no-op, so the same training code runs everywhere. `sync`
holds the plain collectives that lower layers (the quantizers) call.
"""

from vqar.parallel import sync
from vqar.parallel.config import DistConfig
from vqar.parallel.runtime import Parallel, PeerFailed, joined, setup, teardown

__all__ = ["DistConfig", "Parallel", "PeerFailed", "joined", "setup", "sync", "teardown"]
