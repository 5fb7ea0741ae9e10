"""Rounds across the workers.

executor_reuse.py  which executors a worker keeps, and the padded client count (pure policy)
mergeable.py       one mergeable computation across workers, finished on one of them
timing.py          where a round's time went; what a round returns
round_executor.py  `RoundExecutor`: training rounds and evaluations of one algorithm
resilience.py      a round that survives lost workers: live sampling, coverage, retries
diagnosis.py       which clients were not finite, recomputed where they live
prepared.py        the algorithm's computations, compiled once and cached across processes
outputs.py         a round's and an evaluation's figures, from the algorithm's metrics
"""
