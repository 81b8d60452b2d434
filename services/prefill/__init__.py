"""What only a prefill pod does: Prefill handling and the leases on handed-off blocks."""
