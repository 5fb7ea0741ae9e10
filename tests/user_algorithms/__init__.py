"""Learning processes as a user writes them in Python, for the API's tests:
the seed tutorial's own code (TFF 0.87's names), a user-written aggregator,
a user's Keras model and preprocessing, and TFF's federated k-means."""
