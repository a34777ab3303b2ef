"""Weight sync from the trainer to the rollout engines: packed buckets with a version number.

Sending a model tensor by tensor is what makes weight sync slow in practice (one message, one
allocation and one copy per tensor: minutes for a large MoE); here the trainer packs its parameters
into a few flat buffers of about `bucket_bytes` (one dtype per bucket) and sends those. Every bucket
carries the version of the weights it belongs to, and both sides check it:

- the receiver (`VersionedReceiver`) refuses a set of buckets whose versions differ from the announced
  one, that is incomplete, or that is not newer than what it holds (a stale or replayed update);
- the sender (`WeightSync.push`) checks that every engine acknowledges the version it sent, and the
  controller checks the engines' version before each rollout, so a run never samples from, and then
  trains on, weights it did not mean to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from thinkforge.errors import ThinkforgeError


class WeightVersionError(ThinkforgeError):
    """Weights of an unexpected version were offered to, or reported by, a rollout engine."""


@dataclass
class WeightBucket:
    version: int
    index: int  # this bucket's position in the update
    count: int  # buckets in the update
    names: list[str]
    shapes: list[tuple[int, ...]]
    flat: torch.Tensor  # the tensors, flattened and concatenated (one dtype)


def pack_buckets(named: dict[str, torch.Tensor], version: int, bucket_bytes: int) -> list[WeightBucket]:
    """Packs `named` (name order kept, one dtype per bucket) into flat CPU-or-device buffers of about
    `bucket_bytes`; a tensor larger than a bucket gets a bucket of its own."""
    groups: list[tuple[list[str], list[torch.Tensor]]] = []
    size = 0
    for name, t in named.items():
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if not groups or size + nbytes > bucket_bytes or groups[-1][1][0].dtype != t.dtype:
            groups.append(([], []))
            size = 0
        groups[-1][0].append(name)
        groups[-1][1].append(t)
        size += nbytes
    out = []
    for i, (names, tensors) in enumerate(groups):
        flat = torch.cat([t.reshape(-1) for t in tensors])  # a copy: the trainer may step while it travels
        out.append(WeightBucket(version, i, len(groups), names, [tuple(t.shape) for t in tensors], flat))
    return out


def unpack_bucket(bucket: WeightBucket) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for name, shape in zip(bucket.names, bucket.shapes, strict=True):
        n = 1
        for d in shape:
            n *= d
        yield name, bucket.flat[offset: offset + n].view(shape)
        offset += n


class VersionedReceiver:
    """The rollout side of a sync: checks an update's version and completeness, then loads it."""

    def __init__(self, load: Callable[[dict[str, torch.Tensor]], None], version: int = 0) -> None:
        self._load, self.version = load, version

    def receive(self, buckets: list[WeightBucket], version: int) -> int:
        if version <= self.version:
            raise WeightVersionError(f"weight sync: version {version} offered to an engine at version "
                                     f"{self.version} (stale or replayed update refused)")
        bad = [b.version for b in buckets if b.version != version]
        if bad:
            raise WeightVersionError(f"weight sync: update announced as version {version} holds buckets of "
                                     f"version {bad[0]} (refused)")
        counts = {b.count for b in buckets}
        if len(counts) != 1 or sorted(b.index for b in buckets) != list(range(counts.pop())):
            raise WeightVersionError(f"weight sync: update {version} is incomplete "
                                     f"({len(buckets)} buckets, indices {sorted(b.index for b in buckets)})")
        for b in sorted(buckets, key=lambda b: b.index):
            self._load(dict(unpack_bucket(b)))
        self.version = version
        return version


class VersionedEngine(Protocol):
    weight_version: int

    def load_weight_buckets(self, buckets: list[WeightBucket], version: int) -> int: ...


class WeightSync(Protocol):
    """Moves the trainer's weights to every rollout engine; returns the seconds it took."""

    def push(self, named: dict[str, torch.Tensor], version: int) -> float: ...


class InProcessWeightSync:
    """One process: the engine's copy of the model is refreshed from packed buckets (no network)."""

    def __init__(self, engine: VersionedEngine, bucket_bytes: int) -> None:
        self.engine, self.bucket_bytes = engine, bucket_bytes

    def push(self, named: dict[str, torch.Tensor], version: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            buckets = pack_buckets(named, version, self.bucket_bytes)
        check_ack(self.engine.load_weight_buckets(buckets, version), version, "in-process engine")
        return time.perf_counter() - t


def check_ack(got: Any, version: int, who: str) -> None:
    if got != version:
        raise WeightVersionError(f"weight sync: {who} acknowledged version {got}, expected {version}")
