"""Moved to banditgate.drift.quality."""

from banditgate.drift.quality import *  # noqa: F401,F403
