"""Quote-to-cash workflows (process managers keyed by correlation id)."""
