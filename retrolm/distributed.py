"""This process's place in a torch.distributed job: one `Dist` for training's data-parallel
ranks and the database build's block ranks alike (rank 0 of 1 when not distributed).

Joining a job is the caller's: `retrolm.train.init_distributed` for training,
`retrolm.database.distributed.session` for a database build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from retrolm import errors

T = TypeVar("T")


def blocks_for_rank(n_blocks: int, rank: int, world_size: int) -> range:
    """Positions 0..n_blocks-1 that `rank` of `world_size` works on: interleaved by position."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return range(rank, n_blocks, world_size)


@dataclass(frozen=True)
class Dist:
    """Rank, world size and local rank (which local GPU) of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def sum(self, x: Any) -> Any:
        """All-reduce a tensor in place (its sum over the ranks); returns it."""
        if self.enabled:
            import torch.distributed as td

            td.all_reduce(x, op=td.ReduceOp.SUM)
        return x

    def mine(self, items: Sequence[T]) -> list[T]:
        """The items (blocks to do, in a list every rank computed alike) this rank works on."""
        return [items[i] for i in blocks_for_rank(len(items), self.rank, self.world_size)]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on the main rank while the others wait; a user error there is raised on every
        rank (with its message), so that no rank is left waiting at a barrier."""
        if not self.enabled:
            return fn()
        import torch.distributed as td

        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except errors.UserError as e:
                error = e
        box = [None if error is None else (type(error).__name__, str(error))]
        td.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            name, message = box[0]
            kind = getattr(errors, name, None)
            if not (isinstance(kind, type) and issubclass(kind, errors.UserError)):
                kind = errors.UserError
            raise kind(message)
        return result

    def device(self, device: str) -> str:
        """`cuda` -> this rank's local GPU (`cuda:LOCAL_RANK`); other devices unchanged."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.enabled else device
