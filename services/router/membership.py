"""The router's pod membership as discovery reports it: full snapshots in,
the difference to the last one out. Pure (no I/O, no clock), so every
discovery source (static, file, dns, kubernetes) reconciles the same way and
the rules are tested without sockets.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

POOLS = ("prefill", "decode", "unified")
STATES = ("ready", "draining")
EVENT_KINDS = ("added", "draining", "ready", "removed")


@dataclass(frozen=True)
class DiscoveredPod:
    """One pod as a discovery source sees it.

    ``address`` is the pod's gRPC ``host:port`` (``[v6]:port`` for IPv6) and
    its id everywhere in the router. ``state`` ``ready``: a candidate, routed
    to once its ``GetLoad`` answers; ``draining``: no new work, what it runs
    finishes.
    """

    role: str
    address: str
    state: str = "ready"

    def __post_init__(self) -> None:
        if self.role not in POOLS:
            raise ValueError(f"pod role {self.role!r} is not one of {', '.join(POOLS)}")
        if self.state not in STATES:
            raise ValueError(f"pod state {self.state!r} is not one of {', '.join(STATES)}")
        check_address(self.address)


def check_address(address: str) -> None:
    """Raise ``ValueError`` unless ``address`` is ``HOST:PORT`` with a port in 1..65535."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"pod address {address!r} is not HOST:PORT")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"pod address {address!r}: write an IPv6 host as [ADDR]:PORT")


@dataclass(frozen=True)
class Snapshot:
    """A complete view of the pods: ``pods`` maps address -> pod. Build it
    with ``Snapshot.of`` (which rejects an address listed twice)."""

    pods: Mapping[str, DiscoveredPod]

    @classmethod
    def of(cls, pods: Iterable[DiscoveredPod]) -> Snapshot:
        out: dict[str, DiscoveredPod] = {}
        for pod in pods:
            if pod.address in out and out[pod.address] != pod:
                raise ValueError(f"pod {pod.address} is listed twice with different roles or states")
            out[pod.address] = pod
        return cls(MappingProxyType(out))

    def roles(self) -> frozenset[str]:
        return frozenset(p.role for p in self.pods.values())


@dataclass(frozen=True)
class MembershipEvent:
    """``kind``: added (a new pod, in ``pod.state``), draining, ready (a
    draining pod back in rotation), removed (``pod`` is how it was last seen)."""

    kind: str
    pod: DiscoveredPod


class Membership:
    """The last applied snapshot. ``apply`` returns what changed, removals
    first (so an address that changes role is removed before it is added)."""

    def __init__(self) -> None:
        self._pods: dict[str, DiscoveredPod] = {}

    def apply(self, snapshot: Snapshot) -> list[MembershipEvent]:
        removed: list[MembershipEvent] = []
        changed: list[MembershipEvent] = []
        for address, old in sorted(self._pods.items()):
            new = snapshot.pods.get(address)
            if new is None or new.role != old.role:
                removed.append(MembershipEvent("removed", old))
                if new is not None:
                    changed.append(MembershipEvent("added", new))
            elif new.state != old.state:
                changed.append(MembershipEvent(new.state, new))
        for address, new in sorted(snapshot.pods.items()):
            if address not in self._pods:
                changed.append(MembershipEvent("added", new))
        self._pods = dict(snapshot.pods)
        return removed + changed

    @property
    def pods(self) -> Mapping[str, DiscoveredPod]:
        return MappingProxyType(self._pods)
