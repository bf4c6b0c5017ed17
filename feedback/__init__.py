"""The feedback worker (faust): joins outcomes to predictions; updates arms, quality and drift."""
