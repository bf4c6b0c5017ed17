"""Moved to banditgate.drift.reference."""

from banditgate.drift.reference import *
