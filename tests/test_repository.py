"""The model repository on local directories: version policies and labels, publishing and removing
versions while polling, broken versions, reload, and a hot swap under continuous load."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

from runtime.errors import ConfigError, InvalidInput, NotFound
from runtime.model_config import ModelConfig, ModelConfigList
from runtime.repository import Repository
from runtime.servable_cache import ServableCache
from runtime.version_policy import All, Latest, Specific, State

IMAGES = {"images": np.zeros((2, 28, 28, 1), np.float32)}


@pytest.fixture
def base(tmp_path):
    return tmp_path / "models"


def publish(digits, base, version, *, name="digits", manifest_last=True):
    """Hard-link the digits servable in as BASE/NAME/VERSION, manifest.json last as publishers do."""
    target = base / name / str(version)
    shutil.copytree(digits.servable, target, copy_function=os.link,
                    ignore=shutil.ignore_patterns("manifest.json"))
    if manifest_last:
        write_manifest(digits, target)
    return target


def write_manifest(digits, target):
    """Atomically, as a publisher must (an S3 PUT is; a local copy is not until renamed)."""
    shutil.copy(digits.servable / "manifest.json", target / ".manifest.json.tmp")
    os.replace(target / ".manifest.json.tmp", target / "manifest.json")


def repository(base, tmp_path, poll_seconds=0, **model):
    config = ModelConfigList(models=(ModelConfig(name="digits", base_path=str(base / "digits"), **model),))
    repo = Repository(config, poll_seconds=poll_seconds, cache=ServableCache(tmp_path / "cache"))
    repo.start()
    return repo


def states(repo, name="digits"):
    return {s.version: s.state for s in repo.status(name)}


def served_version(repo, **which):
    with repo.handle("digits", **which) as handle:
        assert handle.engine.run("serving_default", IMAGES)["probabilities"].shape == (2, 10)
        return handle.version


@pytest.mark.parametrize("policy, expected", [
    (Latest(), {3}), (Latest(num_versions=2), {2, 3}), (All(), {1, 2, 3}), (Specific(versions=(1, 3)), {1, 3}),
])
def test_version_policies(digits, base, tmp_path, policy, expected):
    for version in (1, 2, 3):
        publish(digits, base, version)
    repo = repository(base, tmp_path, version_policy=policy)
    try:
        assert {v for v, s in states(repo).items() if s is State.AVAILABLE} == expected
        assert served_version(repo) == max(expected)
        for version in expected:
            assert served_version(repo, version=version) == version
        with pytest.raises(NotFound, match="version 9 is not available"):
            served_version(repo, version=9)
    finally:
        repo.stop()


def test_labels(digits, base, tmp_path):
    for version in (1, 2):
        publish(digits, base, version)
    repo = repository(base, tmp_path, version_policy=All(), version_labels={"stable": 1, "canary": 2})
    try:
        assert served_version(repo, label="stable") == 1
        assert served_version(repo, label="canary") == 2
        with pytest.raises(InvalidInput, match="no version label 'beta'"):
            served_version(repo, label="beta")
    finally:
        repo.stop()


def test_unknown_model_is_not_found(digits, base, tmp_path):
    publish(digits, base, 1)
    repo = repository(base, tmp_path)
    try:
        with pytest.raises(NotFound, match="model 'other' is not served"):
            with repo.handle("other"):
                pass
    finally:
        repo.stop()


def test_unpublished_version_waits_for_its_manifest(digits, base, tmp_path):
    publish(digits, base, 1)
    partial = publish(digits, base, 2, manifest_last=False)
    repo = repository(base, tmp_path)
    try:
        assert states(repo) == {1: State.AVAILABLE}
        write_manifest(digits, partial)
        repo.poll()
        assert states(repo) == {2: State.AVAILABLE, 1: State.END}
        assert served_version(repo) == 2
    finally:
        repo.stop()


def corrupt(target):
    library = next((target / "lib").iterdir())
    data = bytearray(library.read_bytes())
    library.unlink()  # it is a hard link to the cached example: replace, do not edit in place
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))


def test_broken_version_shows_its_error_and_the_old_one_keeps_serving(digits, base, tmp_path):
    publish(digits, base, 1)
    repo = repository(base, tmp_path)
    try:
        broken = publish(digits, base, 2, manifest_last=False)
        corrupt(broken)
        write_manifest(digits, broken)
        repo.poll()
        status = {s.version: s for s in repo.status("digits")}
        assert status[2].state is State.ERROR and "sha256" in status[2].error
        assert status[1].state is State.AVAILABLE
        assert served_version(repo) == 1
    finally:
        repo.stop()


def test_versions_added_and_removed_while_polling(digits, base, tmp_path):
    publish(digits, base, 1)
    repo = repository(base, tmp_path, poll_seconds=0.05)
    try:
        publish(digits, base, 2)
        assert repo.wait_for("digits", 2, State.AVAILABLE, timeout=60)
        assert repo.wait_for("digits", 1, State.END, timeout=60)
        shutil.rmtree(base / "digits" / "2")  # withdrawn: the policy falls back to version 1
        assert repo.wait_for("digits", 1, State.AVAILABLE, timeout=60)
        assert repo.wait_for("digits", 2, State.END, timeout=60)
        assert served_version(repo) == 1
    finally:
        repo.stop()


def test_reload_adds_and_removes_models_and_checks_labels(digits, base, tmp_path):
    publish(digits, base, 1)
    publish(digits, base, 1, name="other")
    repo = repository(base, tmp_path)
    try:
        other = ModelConfig(name="other", base_path=str(base / "other"))
        repo.reload(ModelConfigList(models=(other,)))
        with repo.handle("other") as handle:
            assert handle.version == 1
        with pytest.raises(NotFound):
            with repo.handle("digits"):
                pass
        assert states(repo) == {1: State.END}
        bad = other.model_copy(update={"version_labels": {"stable": 7}})
        with pytest.raises(ConfigError, match="label 'stable' cannot be assigned to version 7"):
            repo.reload(ModelConfigList(models=(bad,)))
    finally:
        repo.stop()


def test_hot_swap_under_load_fails_no_request(digits, base, tmp_path):
    """Requests run continuously while version 2 is published and version 1 removed: none fails,
    and every answer comes from a version that was AVAILABLE when the request held it."""
    publish(digits, base, 1)
    repo = repository(base, tmp_path, poll_seconds=0.05)
    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                with repo.handle("digits") as handle:
                    assert repo.status("digits", handle.version)[0].state in (State.AVAILABLE, State.UNLOADING)
                    handle.engine.run("serving_default", IMAGES)
                    answers.append(handle.version)
            except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                failures.append(repr(e))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.3)
        publish(digits, base, 2)
        assert repo.wait_for("digits", 2, State.AVAILABLE, timeout=60)
        shutil.rmtree(base / "digits" / "1")
        assert repo.wait_for("digits", 1, State.END, timeout=60)
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        repo.stop()
    assert failures == []
    assert set(answers) == {1, 2}
    assert answers[-1] == 2
