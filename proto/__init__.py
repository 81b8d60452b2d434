"""Generated protobuf/gRPC stubs of the control plane (built by `make proto`)."""
