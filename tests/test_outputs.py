"""What a round's output becomes: weights as named arrays and back."""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff

from coordinator.rounds.outputs import weight_arrays, weights_from_arrays


def test_weights_go_to_named_arrays_and_come_back_whole():
    model = tff.learning.models.ModelWeights(
        [np.arange(6.0).reshape(2, 3), np.ones(3)], [np.array(7, np.int64)]
    )
    arrays = weight_arrays(model)
    assert sorted(arrays) == ["non_trainable_0", "trainable_0", "trainable_1"]
    trainable, rest = weights_from_arrays(arrays)
    assert [a.tolist() for a in trainable] == [a.tolist() for a in model.trainable]
    assert rest[0] == 7
    # Any structure of tensors (k-means' centroids) counts as trainable.
    centroids = np.full((10, 4), 0.5, np.float32)
    trainable, rest = weights_from_arrays(weight_arrays(centroids))
    assert rest == [] and np.array_equal(trainable[0], centroids)
