"""The image's tag is a hash of exactly its inputs (deploy/container/build.py), so a
built image is reused until one of them changes."""

from __future__ import annotations

import shutil

from deploy.container import build


def _copy_of_the_inputs(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(build.ROOT / "pyproject.toml", root / "pyproject.toml")
    for package in build.PACKAGES:
        if not (build.ROOT / package).is_dir():
            continue  # a package of the list that this checkout does not have
        shutil.copytree(
            build.ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    monkeypatch.setattr(build, "ROOT", root)
    monkeypatch.setattr(build, "LOCK", root / "deploy" / "requirements.lock")
    monkeypatch.setattr(build, "CONTAINERFILE", root / "deploy" / "container" / "Containerfile")
    return root


def test_the_tag_changes_with_each_input_and_only_with_them(tmp_path, monkeypatch):
    root = _copy_of_the_inputs(tmp_path, monkeypatch)
    first = build.content_hash("sha256:base")
    assert build.content_hash("sha256:base") == first
    assert build.content_hash("sha256:another-base") != first

    # Not in the image, so not in the hash: the manifests, bytecode.
    (root / "deploy" / "kubernetes" / "kustomization.yaml").write_text("# edited\n")
    (root / "shared" / "__pycache__").mkdir(exist_ok=True)
    (root / "shared" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert build.content_hash("sha256:base") == first

    for changed in (
        root / "shared" / "loopback_shim.c",
        root / "client_worker" / "proxy.py",
        root / "deploy" / "requirements.lock",
        root / "deploy" / "container" / "Containerfile",
    ):
        original = changed.read_bytes()
        changed.write_bytes(original + b"\n")
        assert build.content_hash("sha256:base") != first, changed
        changed.write_bytes(original)
        assert build.content_hash("sha256:base") == first
    (root / "coordinator" / "new_module.py").write_text("")
    assert build.content_hash("sha256:base") != first


def test_the_image_holds_the_sources_and_not_the_manifests():
    files = {p.as_posix() for p in build.source_files()}
    assert "shared/loopback_shim.c" in files and "deploy/container/healthcheck.py" in files
    assert "pyproject.toml" in files
    assert not any(f.startswith(("deploy/kubernetes", "tests/", "docs/")) for f in files)
    assert not any(f.endswith((".pyc", ".so")) for f in files)
