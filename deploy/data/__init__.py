"""`fedcompose data`: from a federated dataset to worker shards.

cli.py           the command
build.py         data settings -> shards (one path for `data` and `run`)
sources.py       a federated source: clients with train and test examples
default_data.py  the offline default: sklearn digits as synthetic writers
emnist.py        TFF's federated EMNIST (SQLite)
partition.py     whole writers to shards; IID and Dirichlet re-splits
shards.py        writing shards, reusing them, the merged view of all shards
synthetic.py     many synthetic writers (benchmark and scale tests)
client_data.py   your own data (ClientData, mapping, DataFrame) -> shards of any structure
tensor_source.py clients of any element spec, and their IID/Dirichlet re-splits
tff_sqlite.py    any TFF SQLite client-data file (CIFAR-100, Shakespeare, ...) as columns
tables.py        a .npz/.csv/.parquet table with a client-id column as columns
progress.py      progress bars
"""
