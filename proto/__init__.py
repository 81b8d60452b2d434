"""Generated protobuf/gRPC stubs of the control plane (built by every pip build, see setup.py)."""
