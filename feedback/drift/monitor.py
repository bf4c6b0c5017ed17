"""Moved to banditgate.drift.monitor."""

from banditgate.drift.monitor import *  # noqa: F401,F403
