"""The engine-pod process every role runs: server, servicer, transport-free core, config, metrics."""
