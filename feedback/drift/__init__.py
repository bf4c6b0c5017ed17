"""Moved to banditgate.drift (pure statistics shared by gateway and feedback); kept while callers move."""

from banditgate.drift import *
