"""Generated xDS resources and the interface between the server and config generation."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, overload

from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_request import PushRequest


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource, serialized once. Shared by every proxy that receives it."""

    name: str
    version: str
    body: any_pb2.Any

    @staticmethod
    def of(name: str, message: Message, type_url: str) -> Resource:
        # Deterministic serialization so equal content always hashes to the same version.
        return Resource.of_bytes(name, message.SerializeToString(deterministic=True), type_url)

    @staticmethod
    def of_bytes(name: str, data: bytes, type_url: str) -> Resource:
        """From an already serialized message (e.g. assembled from serialized parts)."""
        version = hashlib.blake2b(data, digest_size=8).hexdigest()
        return Resource(name=name, version=version, body=any_pb2.Any(type_url=type_url, value=data))


class Joined(Sequence[Resource]):
    """Resources in consecutive parts, without copying them into one list.

    A sidecar's CDS or LDS answer is its own small part (inbound, fixed) followed by
    the outbound part that every proxy of its scope shares: the parts stay shared
    objects, so their framing is cached once (wire.Encoder) and the per-proxy answer
    costs two references. `shared_parts` says which parts are such cached objects.
    """

    __slots__ = ("_len", "parts", "shared_parts")

    def __init__(self, parts: Sequence[Sequence[Resource]], shared_parts: Sequence[bool]) -> None:
        self.parts = tuple(parts)
        self.shared_parts = tuple(shared_parts)
        self._len = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Resource]:
        return itertools.chain.from_iterable(self.parts)

    @overload
    def __getitem__(self, index: int) -> Resource: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Resource]: ...

    def __getitem__(self, index: int | slice) -> Resource | Sequence[Resource]:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += self._len
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


@dataclass(frozen=True, slots=True)
class Generated:
    """The answer for one type and proxy.

    `complete` is true when `resources` is the whole set the proxy should have for this
    type given its subscription (so anything previously sent and not here is removed);
    false when it is only the changed subset (incremental EDS).

    `shared` is true when `resources` is a cached object that other proxies get too, so
    the server may keep its encoding keyed by identity; false when it was built for this
    request only (e.g. it answers names that do not exist): keeping anything derived
    from it would let a client fill the server's memory with made-up names.
    """

    resources: Sequence[Resource]
    complete: bool = True
    shared: bool = True


class PushContextLike(Protocol):
    """What the server needs of a PushContext: an identity for versions and logs."""

    @property
    def version(self) -> str: ...


C_contra = TypeVar("C_contra", bound=PushContextLike, contravariant=True)


class Generator(Protocol[C_contra]):
    """Builds resources for a proxy. The server calls it; it never builds config itself.

    Generic in the push context it reads: the server only passes on the contexts that the
    pusher built, so a generator may ask for the concrete type it was built for.
    """

    def generate(
        self,
        type_url: str,
        proxy: Proxy,
        push: C_contra,
        names: frozenset[str] | None,
        request: PushRequest | None,
    ) -> Generated | None:
        """Resources of `type_url` for `proxy`.

        `names` is the subscription (None for a wildcard subscription). `request` is the
        push that triggered this (None when answering a client request). Returns None
        when the push does not affect this type for this proxy: nothing to send.
        """
        ...


def same_versions(a: Sequence[Resource], b: Sequence[Resource]) -> bool:
    """Equal names and versions, in order: the same content for the proxy."""
    if a is b:
        return True
    if (
        isinstance(a, Joined)
        and isinstance(b, Joined)
        and len(a.parts) == len(b.parts)
        and all(x is y for x, y in zip(a.parts, b.parts, strict=True))
    ):
        return True
    if len(a) != len(b):
        return False
    return all(x.name == y.name and x.version == y.version for x, y in zip(a, b, strict=True))
