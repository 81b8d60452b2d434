"""KV block transfer between pods (NIXL)."""
