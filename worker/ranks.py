"""``Ranks``: one rank's view of a multi-process job. Its own module because both the launcher
(worker.distributed) and the training loop (worker.train) use it, and the loop must not import the launcher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


class Ranks:
    """One rank's view of the job's default process group: its rows of each batch and the small collectives
    the loop needs besides DDP's gradient sync (stop verdicts, the step's loss and token count)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, sharding: str = "none") -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.sharding = sharding

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2 over the ranks (``training.sharding = "full"``) instead of DDP."""
        return self.sharding == "full" and self.world_size > 1

    def shard(self, batch: Sequence[Any]) -> list[Any]:
        """This rank's rows of a global micro-batch: contiguous, sizes differing by at most one, disjoint
        across ranks and together all of it (a batch smaller than the world leaves some shards empty)."""
        base, extra = divmod(len(batch), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(batch[start : start + base + (1 if self.rank < extra else 0)])

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel`` over the trainable parameters only: every rank loads the same frozen
        base, so DDP neither broadcasts nor reduces it (on a 7 B base that broadcast alone would be 14 GB)."""
        from torch.nn.parallel import DistributedDataParallel

        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def from_main(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item() > 0)

    def sum_stats(self, loss: float, tokens: int) -> tuple[float, int]:
        stats = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        return float(stats[0]), int(round(float(stats[1])))
