"""Ops-side tooling: the local stack, broker configuration, and (later) the fleet CA."""
