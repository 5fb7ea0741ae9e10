"""`fedcompose bench`: the benchmark.

cli.py               the command: settings, data, the grid, results
plan.py              what every measured system runs (same clients, data, settings)
runner.py            one child process per system; memory sampling; collecting rounds
protocol.py          how the children report (JSON lines on stdout)
keras_floor.py       child: plain Keras over the same examples (compute floor)
client_loop.py       child: every client's own dataset and update in one tf.function, no executor
tff_local.py         child: TFF's single-process local context (also the tests' reference)
fedcompose_child.py  child: the coordinator, against worker processes
memory.py            peak memory of every process
report.py            medians, ratios, targets, the table
curves.py            cost curves: memory against clients per round, scale against hosted clients
scale_child.py       child: the coordinator at scale, timing what grows with hosted clients
pinning.py           pinned mode: each measured process on cores of its own
chaos.py             `--chaos`: a soak of a run that loses workers
sweep.py             a sweep in one federation against separate runs (python -m ...sweep)
checkpoint_cost.py   one checkpoint's cost, TFF's state manager against the npz (python -m ...)
"""
