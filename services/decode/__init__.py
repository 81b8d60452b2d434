"""What only a decode pod does: pull KV named by a handle from prefill pods (peer clients, directory)."""
