"""Code used by both the coordinator and the client workers."""
