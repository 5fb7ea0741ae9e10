"""The offline default: scikit-learn's handwritten digits as a federated dataset.

The 1,797 8x8 digits ship inside scikit-learn, so this needs no download. Each
image is upscaled to a 20x20 box centred in 28x28 (EMNIST's layout), put in
EMNIST's polarity (ink 0, background 1) and dealt to synthetic writers whose
label mix follows a Dirichlet distribution, so that the federation is
non-IID the way real writers are. Each writer's examples are split into train
and held-out test.
"""

from __future__ import annotations

import numpy as np

from deploy.data.sources import ClientData, FederatedSource
from shared.errors import UsageError

DATASET_NAME = "sklearn-digits"
NUM_CLASSES = 10


def digits_as_emnist() -> tuple[np.ndarray, np.ndarray]:
    """All sklearn digits as [n, 28, 28] float32 in EMNIST polarity, and labels."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images.astype(np.float32) / 16.0
    # order=1 (bilinear) keeps strokes smooth without ringing outside [0, 1].
    box = ndimage.zoom(ink, (1, 20 / 8, 20 / 8), order=1)
    images = np.zeros((len(ink), 28, 28), dtype=np.float32)
    images[:, 4:24, 4:24] = np.clip(box, 0.0, 1.0)
    return 1.0 - images, digits.target.astype(np.int32)


def _deal_to_writers(
    labels: np.ndarray, num_writers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices per writer; each writer's label mix is drawn from Dirichlet(alpha)."""
    pools = [list(rng.permutation(np.flatnonzero(labels == k))) for k in range(NUM_CLASSES)]
    sizes = np.full(num_writers, len(labels) // num_writers)
    sizes[: len(labels) % num_writers] += 1
    writers: list[np.ndarray] = []
    for size in sizes:
        mix = rng.dirichlet(np.full(NUM_CLASSES, alpha))
        taken = []
        for _ in range(size):
            available = np.array([len(p) > 0 for p in pools], dtype=float)
            weights = mix * available
            if weights.sum() <= 0:
                weights = available
            k = rng.choice(NUM_CLASSES, p=weights / weights.sum())
            taken.append(pools[k].pop())
        writers.append(np.array(taken, dtype=np.int64))
    return writers


def load(
    num_writers: int = 60,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedSource:
    if num_writers < 1:
        raise ValueError(f"num_writers must be >= 1, got {num_writers}")
    pixels, labels = digits_as_emnist()
    if num_writers > len(labels) // 2:
        raise UsageError(
            f"--writers {num_writers} leaves fewer than 2 examples per writer "
            f"({len(labels)} digits); use at most {len(labels) // 2}"
        )
    rng = np.random.default_rng(seed)
    clients = []
    for w, idx in enumerate(_deal_to_writers(labels, num_writers, alpha, rng)):
        idx = rng.permutation(idx)
        n_test = max(1, round(len(idx) * test_fraction))
        test, train = idx[:n_test], idx[n_test:]
        clients.append(
            ClientData(
                id=f"writer_{w:04d}",
                train_pixels=pixels[train],
                train_labels=labels[train],
                test_pixels=pixels[test],
                test_labels=labels[test],
            )
        )
    return FederatedSource(
        dataset=DATASET_NAME,
        num_classes=NUM_CLASSES,
        clients=clients,
        description=(
            f"sklearn digits as {num_writers} synthetic writers "
            f"(Dirichlet alpha={alpha}, seed={seed})"
        ),
    )
