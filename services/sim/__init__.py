"""Simulated pods: the real pod (gRPC service, scheduler, block pool, prefix
cache, leases, KV events) with a latency model in place of the model and a
transport that moves no bytes, many to a process (``splitserve serve sim``).
For fleet-scale tests and benches of the router (``bench/fleet.py``)."""
