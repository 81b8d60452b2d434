"""A prefill-like NIXL peer for the two-process tests and the benchmark.

Holds a KV cache of known contents (``known_cache(shape, seed)``), serves its
transfer metadata and lease events on stdout as ``@@``-prefixed lines (NIXL
logs to stdout too), and takes commands on stdin:

    reserve <request_id> <id,id,...> <ttl_s>   -> @@RESERVED <request_id>
    claim <request_id>                         -> @@CLAIMED <request_id> <ids> | @@NOTFOUND <request_id>
    status                                     -> @@STATUS <leased_blocks> <reads_released>
    quit                                       -> exits

A ``release:<request_id>`` notification releases that lease and prints
``@@RELEASED <request_id> <ids>``. It exits when stdin closes (its parent
died) or after ``--max-seconds``, so it never outlives a test.
"""
from __future__ import annotations

import argparse
import base64
import select
import sys
import time

import torch

from splitserve.kvtransfer import LeaseNotFoundError, LeaseTable
from splitserve.kvtransfer.nixl_transport import NixlTransport

PREFIX = "@@"


def known_cache(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The cache contents both test processes can compute independently."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def emit(*words: object) -> None:
    sys.stdout.write(PREFIX + " ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent-name", required=True)
    parser.add_argument("--shape", required=True, help="comma-separated 6-d cache shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", action="store_true", help="fill with randn (else zeros; bench)")
    parser.add_argument("--ucx-tls", default=None)
    parser.add_argument("--fingerprint", default="test-model")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.shape.split(","))
    cache = known_cache(shape, args.seed) if args.random else torch.zeros(shape)
    transport = NixlTransport(args.agent_name, cache, model_fingerprint=args.fingerprint,
                              ucx_tls=args.ucx_tls)
    leases = LeaseTable(claim_timeout_s=30.0)
    emit("METADATA", base64.b64encode(transport.local_metadata().to_bytes()).decode("ascii"))
    deadline = time.monotonic() + args.max_seconds
    stdin = sys.stdin.fileno()
    while time.monotonic() < deadline:
        for _peer, payload in transport.get_notifications():
            if payload.startswith(b"release:"):
                request_id = payload[len(b"release:"):].decode()
                try:
                    ids = leases.release(request_id)
                    emit("RELEASED", request_id, ",".join(map(str, ids)))
                except LeaseNotFoundError:
                    emit("NOTFOUND", request_id)
        ready, _, _ = select.select([stdin], [], [], 0.0005)
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:
            break  # parent gone
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "reserve":
            leases.reserve(cmd[1], [int(b) for b in cmd[2].split(",")], float(cmd[3]))
            emit("RESERVED", cmd[1])
        elif cmd[0] == "claim":
            try:
                emit("CLAIMED", cmd[1], ",".join(map(str, leases.claim(cmd[1]))))
            except LeaseNotFoundError:
                emit("NOTFOUND", cmd[1])
        elif cmd[0] == "status":
            emit("STATUS", leases.num_leased_blocks, leases.leases_released)
    transport.close()
    emit("EXIT", leases.num_leased_blocks)


if __name__ == "__main__":
    main()
