"""Rounds across the workers.

executor_reuse.py  which executors a worker keeps, and the padded client count (pure policy)
mergeable.py       one mergeable computation across workers, finished on one of them
timing.py          where a round's time went; what a round returns
round_executor.py  `RoundExecutor`: training rounds and evaluations of one algorithm
resilience.py      a round that survives lost workers: live sampling, coverage, retries
outage.py          waiting out an outage of (nearly) every worker, up to --outage-wait
"""
