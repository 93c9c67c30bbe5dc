"""Sweeps: plan many `lm.main` runs from one sweep config (launch/plan.py) and run them on a
backend (launch/backends.py), resumably (launch/sweep.py)."""
