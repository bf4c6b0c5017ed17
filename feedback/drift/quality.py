"""Moved to banditgate.drift.quality."""

from banditgate.drift.quality import *
