"""The coordinator: composes the learning algorithm and drives rounds across workers."""
