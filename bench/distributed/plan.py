"""The sharding plan: which rank holds which table (or which rows of it), balanced by bytes."""

from __future__ import annotations

import dataclasses
from typing import Sequence

SHARDING_MODES = ("table", "row", "auto")
TABLE_WISE, ROW_WISE, REPLICATED = "table", "row", "replicated"
# auto: a table this small is copied to every rank (data parallel) rather than sharded: its
# gradient allreduce costs less than an all-to-all slot (the DLRM reference's rule of thumb).
REPLICATE_BELOW_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class TablePlacement:
    """Where one table lives: kind, its owner (table-wise) and each rank's row range (row-wise)."""

    table: int
    kind: str  # table, row or replicated
    bytes: int
    owner: int = -1  # table-wise only
    row_ranges: tuple[tuple[int, int], ...] = ()  # row-wise only: [start, end) per rank


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Every table's placement over world_size ranks."""

    world_size: int
    mode: str
    placements: tuple[TablePlacement, ...]
    replicate_below_bytes: int = REPLICATE_BELOW_BYTES

    def of_kind(self, kind: str) -> list[TablePlacement]:
        """Placements of one kind, in table order."""
        return [placement for placement in self.placements if placement.kind == kind]

    def owned_by(self, rank: int) -> list[int]:
        """Tables held whole by a rank (table-wise), in table order."""
        return [p.table for p in self.placements if p.kind == TABLE_WISE and p.owner == rank]

    def rank_bytes(self) -> list[int]:
        """Embedding bytes each rank holds (replicated tables count on every rank)."""
        held = [0] * self.world_size
        for placement in self.placements:
            if placement.kind == TABLE_WISE:
                held[placement.owner] += placement.bytes
            elif placement.kind == REPLICATED:
                held = [value + placement.bytes for value in held]
            else:
                total_rows = placement.row_ranges[-1][1]
                for rank, (start, end) in enumerate(placement.row_ranges):
                    held[rank] += placement.bytes * (end - start) // total_rows
        return held

    def sent_slots(self, rank: int) -> int:
        """Pooled vectors per sample a rank contributes to the all-to-all."""
        return len(self.owned_by(rank)) + len(self.of_kind(ROW_WISE))

    def to_dict(self) -> dict:
        """A compact record for a row's params."""
        return {"mode": self.mode, "world_size": self.world_size,
                "tables": [{"table": p.table, "kind": p.kind, "owner": p.owner,
                            "rows": [list(r) for r in p.row_ranges]} for p in self.placements],
                "rank_bytes": self.rank_bytes()}

    def describe(self) -> str:
        """The printed plan: one line per rank and one per row-wise or replicated table."""
        lines = [f"sharding plan ({self.mode}, {self.world_size} ranks):"]
        for rank, held in enumerate(self.rank_bytes()):
            tables = ",".join(str(table) for table in self.owned_by(rank)) or "-"
            lines.append(f"  rank {rank}: tables [{tables}] whole, {held / 2**20:,.1f} MiB "
                         "of embeddings")
        for placement in self.of_kind(ROW_WISE):
            lines.append(f"  table {placement.table}: row-wise over all ranks, rows "
                         + " ".join(f"{start}-{end}" for start, end in placement.row_ranges))
        replicated = [str(p.table) for p in self.of_kind(REPLICATED)]
        if replicated:
            lines.append(f"  tables [{','.join(replicated)}]: replicated (data parallel, "
                         f"each under {self.replicate_below_bytes / 1024:g} KiB)")
        return "\n".join(lines)


def row_ranges(rows: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """Near-equal contiguous row blocks, one per rank (the first ranks take the remainder)."""
    base, extra = divmod(rows, world_size)
    ranges, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return tuple(ranges)


def plan_sharding(table_rows: Sequence[int], dim: int, world_size: int, mode: str,
                  bytes_per_value: int = 4,
                  replicate_below_bytes: int = REPLICATE_BELOW_BYTES) -> ShardingPlan:
    """Table-wise (greedy, largest first onto the least-loaded rank), row-wise, or auto:
    replicate tiny tables, split by rows any table larger than one rank's share, and place
    the rest table-wise."""
    if mode not in SHARDING_MODES:
        raise ValueError(f"unknown sharding {mode!r}; choose from {', '.join(SHARDING_MODES)}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    sizes = [rows * dim * bytes_per_value for rows in table_rows]
    share = sum(sizes) / world_size
    kinds = []
    for rows, size in zip(table_rows, sizes):
        if mode == "row" and rows >= world_size:
            kinds.append(ROW_WISE)
        elif mode == "auto" and world_size > 1 and size < replicate_below_bytes:
            kinds.append(REPLICATED)
        elif mode == "auto" and world_size > 1 and size > share and rows >= world_size:
            kinds.append(ROW_WISE)
        else:
            kinds.append(TABLE_WISE)
    # Row-wise shards land evenly on every rank, so they count toward each rank's load.
    load = [sum(size for size, kind in zip(sizes, kinds) if kind == ROW_WISE) / world_size
            ] * world_size
    owners = {}
    for table in sorted(range(len(sizes)), key=lambda index: (-sizes[index], index)):
        if kinds[table] == TABLE_WISE:
            owner = min(range(world_size), key=lambda rank: (load[rank], rank))
            owners[table] = owner
            load[owner] += sizes[table]
    placements = tuple(
        TablePlacement(table=index, kind=kind, bytes=size, owner=owners.get(index, -1),
                       row_ranges=row_ranges(table_rows[index], world_size)
                       if kind == ROW_WISE else ())
        for index, (size, kind) in enumerate(zip(sizes, kinds)))
    return ShardingPlan(world_size=world_size, mode=mode, placements=placements,
                        replicate_below_bytes=replicate_below_bytes)
