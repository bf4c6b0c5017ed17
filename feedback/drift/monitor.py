"""Moved to banditgate.drift.monitor."""

from banditgate.drift.monitor import *
