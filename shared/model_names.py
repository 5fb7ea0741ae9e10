"""Names of the models fedcompose offers (importable without TensorFlow)."""

MODELS = ("linear", "cnn")
