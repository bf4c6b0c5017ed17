"""Load generators, peer harnesses, benchmark scenarios and the demo."""
