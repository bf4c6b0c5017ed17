"""Routing policies (pure math) and the arm-statistics store (the only Redis code here)."""
