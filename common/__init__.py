"""Stdlib-only modules shared by the host and the guest."""
