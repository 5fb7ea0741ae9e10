"""Differential privacy spent by a run with a DP aggregator, all in one place.

accountant.py  (epsilon, delta) of the rounds so far, each as the draw it was
ledger.py      the run directory's privacy.jsonl: every DP round run, re-runs included
spending.py    a run's spending: restored from the ledger on resume, added to each round
"""
