"""A client worker: one shard of clients behind TFF's C++ executor service."""
