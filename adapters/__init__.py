"""Vendor protocols: native views, mapping, clients and sandboxes, per system kind."""
