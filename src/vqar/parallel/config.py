"""The `dist.*` section of a training run."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("ddp", "fsdp")
FSDP_MODES = ("full", "hybrid")


@dataclass
class DistConfig:
    """How a run launched by torchrun splits its work. `data.batch_size` is always the global batch: each of
    the W processes takes batch_size / W, so a run gives the same updates on any number of processes.

    strategy: "ddp" replicates the model and averages gradients; "fsdp" (AR models) shards parameters, gradients
        and optimizer state over the processes (FSDP2 `fully_shard`, one unit per transformer block).
    fsdp_mode: "full" shards over all processes; "hybrid" shards within groups of `hybrid_shard_size`
        processes (one node by default) and replicates across the groups, so the all-gathers stay on the node.
    find_unused_parameters: DDP's option for models with branches that some steps do not use.
    timeout_minutes: how long a collective may wait for a lagging or dead rank before the run fails.
    """

    strategy: str = "ddp"
    fsdp_mode: str = "full"
    hybrid_shard_size: int | None = None
    find_unused_parameters: bool = False
    timeout_minutes: float = 30.0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"dist.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.fsdp_mode not in FSDP_MODES:
            raise ValueError(f"dist.fsdp_mode must be one of {FSDP_MODES}, got {self.fsdp_mode!r}")
        if self.hybrid_shard_size is not None and self.hybrid_shard_size < 1:
            raise ValueError(f"dist.hybrid_shard_size must be >= 1, got {self.hybrid_shard_size}")
        if self.timeout_minutes <= 0:
            raise ValueError(f"dist.timeout_minutes must be positive, got {self.timeout_minutes}")
