"""The compile cache hands back exactly the computations a build makes.

What a worker runs is the serialized computation, and what the coordinator
reads back is shaped by the computation's types: an entry that gives the same
bytes for both, with the same Python containers in the types, gives the same
run. The DP algorithm has the oddest containers (TF Privacy's query states,
dp-accounting's run-time namedtuples).
"""

from __future__ import annotations

import json
import logging
import zipfile

import pytest

from tests.conftest import ROOT


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("FEDCOMPOSE_CACHE_DIR", str(directory))
    return directory


def _spec(**blocks):
    from coordinator.algorithm import AlgorithmSpec

    return AlgorithmSpec.from_dict({"blocks": blocks})


def _bytes(prepared) -> dict:
    return {name: comp.to_bytes() for name, comp in prepared.computations.items()}


def test_a_cached_algorithm_is_the_built_one_byte_for_byte(cache):
    from coordinator.executor_client.computations import type_to_data
    from coordinator.rounds import prepared

    spec = _spec(aggregator="dp_adaptive", weighting="uniform", server_optimizer="adam")
    built = prepared.prepare(spec)
    assert not built.cached and len(list(cache.glob("*.zip"))) == 1
    loaded = prepared.prepare(spec)
    assert loaded.cached
    # A DP algorithm's share fuses too: the fused share is cached with the rest.
    assert set(loaded.computations) == {*prepared.NAMES, prepared.FUSED}
    assert _bytes(loaded) == _bytes(built)
    assert loaded.fused_note == built.fused_note == ""
    remade = 0
    for name, comp in loaded.computations.items():
        original = built.computations[name]
        for kind in ("result_type", "parameter_type"):
            back, before = getattr(comp, kind), getattr(original, kind)
            # Containers too: results are rebuilt into them (state.global_model_weights...).
            data = type_to_data(before) if before is not None else None
            assert (type_to_data(back) if back is not None else None) == data, (name, kind)
            if '"namedtuple"' in json.dumps(data):
                remade += 1  # dp-accounting's run-time class: one of the same shape
            else:
                assert back == before, (name, kind)
    assert remade  # the DP algorithm has them: the case is covered
    after_merge = loaded.computations["train.after_merge"].result_type
    assert after_merge.python_container.__name__ == "LearningProcessOutput"


def test_the_key_follows_settings_versions_and_code(cache):
    from coordinator.rounds import prepared

    base = prepared.cache_key(_spec())
    assert prepared.cache_key(_spec()) == base
    assert prepared.cache_key(_spec(server_optimizer="adam")) != base
    assert prepared.cache_key(_spec(), sources="other code") != base
    # Every source file of coordinator/ and shared/ is in the digest.
    digest = prepared._source_digest()
    probe = ROOT / "shared" / "_cache_key_probe.py"
    try:
        probe.write_text("# changes the digest\n")
        assert prepared._source_digest() != digest
    finally:
        probe.unlink()
    assert prepared._source_digest() == digest


class _Tiny:
    """A prepared algorithm of one small computation, for the cache's file handling."""

    @staticmethod
    def build(spec):
        import numpy as np
        import tensorflow_federated as tff

        from coordinator.executor_client import PreparedComputation
        from coordinator.rounds import prepared

        @tff.tensorflow.computation(np.float32)
        def double(x):
            return x * 2.0

        comp = PreparedComputation(double, "double")
        return prepared.PreparedAlgorithm(spec, {name: comp for name in prepared.NAMES})


def test_a_damaged_entry_is_rebuilt_with_a_warning_and_replaced(cache, monkeypatch, caplog):
    from coordinator.rounds import prepared

    monkeypatch.setattr(prepared, "build", _Tiny.build)
    spec = _spec()
    first = prepared.prepare(spec)
    (entry,) = cache.glob("*.zip")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short, as by a full disk
    with caplog.at_level(logging.WARNING, logger="fedcompose.coordinator"):
        again = prepared.prepare(spec)
    assert not again.cached
    assert "cannot be read" in caplog.text and str(entry) in caplog.text
    assert zipfile.is_zipfile(entry) and prepared.prepare(spec).cached
    assert _bytes(prepared.prepare(spec)) == _bytes(first)


def test_an_unwritable_cache_costs_the_build_not_the_run(tmp_path, monkeypatch):
    from coordinator.rounds import prepared

    monkeypatch.setattr(prepared, "build", _Tiny.build)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FEDCOMPOSE_CACHE_DIR", str(blocker / "cache"))
    assert not prepared.prepare(_spec()).cached
    monkeypatch.setenv("FEDCOMPOSE_CACHE_DIR", "off")
    assert prepared.cache_dir() is None and not prepared.prepare(_spec()).cached


def test_only_the_newest_entries_are_kept(cache, monkeypatch):
    from coordinator.rounds import prepared

    monkeypatch.setattr(prepared, "build", _Tiny.build)
    monkeypatch.setattr(prepared, "KEEP", 3)
    for rate in (0.1, 0.2, 0.3, 0.4, 0.5):
        prepared.prepare(_spec(server_beta_1=rate))
    entries = list(cache.glob("*.zip"))
    assert len(entries) == 3
    kept = {prepared.cache_key(_spec(server_beta_1=r)) for r in (0.3, 0.4, 0.5)}
    assert {e.stem for e in entries} == kept


def test_a_container_outside_the_known_packages_is_refused():
    from coordinator.executor_client.computations import type_from_data

    data = {"struct": [["x", {"struct": []}]], "container": "os:system"}
    with pytest.raises(ValueError, match="is not one TFF"):
        type_from_data(data)


def test_a_directory_others_can_write_to_is_not_used(cache, monkeypatch, caplog):
    from coordinator.rounds import prepared

    monkeypatch.setattr(prepared, "build", _Tiny.build)
    prepared.prepare(_spec())
    assert cache.stat().st_mode & 0o777 == 0o700  # made this user's alone
    cache.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="fedcompose.coordinator"):
        assert not prepared.prepare(_spec()).cached
    assert "other users can write to it" in caplog.text
    cache.chmod(0o700)
    assert prepared.prepare(_spec()).cached
