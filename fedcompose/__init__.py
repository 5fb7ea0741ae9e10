"""fedcompose's Python API: a federation of worker processes, and your own TFF
learning process trained across them.

    import fedcompose

    with fedcompose.LocalFederation(workers=3) as federation:
        result = federation.train(process, preprocess=preprocess, model_fn=model_fn,
                                  rounds=20, clients_per_round=10, eval_every=5)
    result.history  # a pandas table, one row per round
    result.plot()

Your own data: `fedcompose.build_shards(client_data, "shards", workers=3)` (a TFF
ClientData, a mapping client id -> arrays, or a DataFrame), then
`LocalFederation(shards_dir="shards")`; `federation.raw_element_spec()` is what
`preprocess` gets. See docs/python-api.md and docs/data.md. The implementation
lives in `coordinator/` and `deploy/`; this package only names what a user imports.
"""

from __future__ import annotations

from typing import Any

from shared.quiet import quiet_tensorflow

# Before TensorFlow loads, wherever it is imported from: its C++ log level is read once.
quiet_tensorflow()

__all__ = [
    "FedcomposeError",
    "LocalFederation",
    "RemoteFederation",
    "TrainingResult",
    "build_shards",
    "empty_client_dataset",
    "raw_element_spec",
    "run_in_tff",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import fedcompose` stays cheap.
    if name == "LocalFederation":
        from deploy.local_federation import LocalFederation

        return LocalFederation
    if name in ("RemoteFederation", "TrainingResult"):
        from coordinator import api

        return getattr(api, name)
    if name == "build_shards":
        from deploy.data.client_data import build_shards

        return build_shards
    if name == "raw_element_spec":
        from shared.preprocessing import raw_element_spec

        return raw_element_spec
    if name == "empty_client_dataset":
        from coordinator.algorithm.user_process import empty_raw_dataset

        return empty_raw_dataset
    if name == "run_in_tff":
        from coordinator.tff_reference import run

        return run
    if name == "FedcomposeError":
        from shared.errors import FedcomposeError

        return FedcomposeError
    raise AttributeError(f"module 'fedcompose' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
