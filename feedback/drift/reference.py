"""Moved to banditgate.drift.reference."""

from banditgate.drift.reference import *  # noqa: F401,F403
