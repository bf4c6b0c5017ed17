"""Transports: thin adapters that decode, call the dataplane, and encode."""
