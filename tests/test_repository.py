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
from runtime.storage import Retry
from runtime.version_policy import All, Latest, Specific, State

FAST = Retry(attempts=3, delay=0.01, max_delay=0.05, deadline=5)

IMAGES = {"images": np.zeros((2, 28, 28, 1), np.float32)}


class Store:
    """BASE/NAME/VERSION on local disk or in an S3 bucket, published as publishers do: every file,
    then manifest.json last (atomically: an S3 PUT is; a local copy is renamed into place)."""

    def __init__(self, digits, root, client=None, bucket=None):
        self.digits, self.root, self.client, self.bucket = digits, root, client, bucket

    def base_path(self, name="digits"):
        return f"s3://{self.bucket}/models/{name}" if self.client else str(self.root / name)

    def publish(self, version, *, name="digits", manifest=True, damage=None):
        files = {str(p.relative_to(self.digits.servable)): p for p in self.digits.servable.rglob("*")
                 if p.is_file() and p.name != "manifest.json"}
        for relative, path in files.items():
            data = path.read_bytes() if damage and relative.startswith("lib/") else None
            if data is not None:
                damage = None  # one library, one flipped byte
                data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
            self._put(f"{name}/{version}/{relative}", path, data)
        if manifest:
            self.publish_manifest(version, name=name)

    def publish_manifest(self, version, *, name="digits"):
        self._put(f"{name}/{version}/manifest.json", self.digits.servable / "manifest.json")

    def remove(self, version, *, name="digits"):
        if self.client:
            listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"models/{name}/{version}/")
            for item in listed.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
        else:
            shutil.rmtree(self.root / name / str(version))

    def _put(self, key, source, data=None):
        if self.client:
            body = data if data is not None else source.read_bytes()
            self.client.put_object(Bucket=self.bucket, Key=f"models/{key}", Body=body)
            return
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            target.write_bytes(data)
        elif target.name == "manifest.json":
            shutil.copy(source, target.with_name(".manifest.json.tmp"))
            os.replace(target.with_name(".manifest.json.tmp"), target)
        else:
            os.link(source, target)  # the libraries are large: share the example's bytes


@pytest.fixture(params=["local", "s3"])
def store(request, digits, tmp_path):
    if request.param == "local":
        return Store(digits, tmp_path / "models")
    client, bucket = request.getfixturevalue("bucket")
    return Store(digits, None, client, bucket)


def repository(store, tmp_path, poll_seconds=0, **model):
    config = ModelConfigList(models=(ModelConfig(name="digits", base_path=store.base_path(), **model),))
    repo = Repository(config, poll_seconds=poll_seconds, cache=ServableCache(tmp_path / "cache"), retry=FAST)
    repo.start()
    return repo


def states(repo, name="digits"):
    return {s.version: s.state for s in repo.status(name).versions}


def served_version(repo, **which):
    with repo.hold("digits", **which) as handle:
        assert handle.engine.run("serving_default", IMAGES)["probabilities"].shape == (2, 10)
        return handle.version


@pytest.mark.parametrize("policy, expected", [
    (Latest(), {3}), (Latest(num_versions=2), {2, 3}), (All(), {1, 2, 3}), (Specific(versions=(1, 3)), {1, 3}),
])
def test_version_policies(store, tmp_path, policy, expected):
    for version in (1, 2, 3):
        store.publish(version)
    repo = repository(store, tmp_path, version_policy=policy)
    try:
        assert {v for v, s in states(repo).items() if s is State.AVAILABLE} == expected
        assert served_version(repo) == max(expected)
        for version in expected:
            assert served_version(repo, version=version) == version
        with pytest.raises(NotFound, match="version 9 is not available"):
            served_version(repo, version=9)
    finally:
        repo.stop()


def test_labels(store, tmp_path):
    for version in (1, 2):
        store.publish(version)
    repo = repository(store, tmp_path, version_policy=All(), version_labels={"stable": 1, "canary": 2})
    try:
        assert served_version(repo, label="stable") == 1
        assert served_version(repo, label="canary") == 2
        with pytest.raises(InvalidInput, match="no version label 'beta'"):
            served_version(repo, label="beta")
    finally:
        repo.stop()


def test_unknown_model_is_not_found(store, tmp_path):
    store.publish(1)
    repo = repository(store, tmp_path)
    try:
        with pytest.raises(NotFound, match="model 'other' is not served"):
            with repo.hold("other"):
                pass
    finally:
        repo.stop()


def test_unpublished_version_waits_for_its_manifest(store, tmp_path):
    store.publish(1)
    store.publish(2, manifest=False)
    repo = repository(store, tmp_path)
    try:
        assert states(repo) == {1: State.AVAILABLE}
        store.publish_manifest(2)
        repo.poll()
        assert states(repo) == {2: State.AVAILABLE, 1: State.END}
        assert served_version(repo) == 2
    finally:
        repo.stop()


def test_broken_version_shows_its_error_and_the_old_one_keeps_serving(store, tmp_path):
    store.publish(1)
    repo = repository(store, tmp_path)
    try:
        store.publish(2, damage=True)
        repo.poll()
        status = {s.version: s for s in repo.status("digits").versions}
        assert status[2].state is State.ERROR and "sha256" in status[2].error
        assert status[1].state is State.AVAILABLE
        assert served_version(repo) == 1
    finally:
        repo.stop()


def test_versions_added_and_removed_while_polling(store, tmp_path):
    store.publish(1)
    repo = repository(store, tmp_path, poll_seconds=0.05)
    try:
        store.publish(2)
        assert repo.wait_for("digits", 2, State.AVAILABLE, timeout=60)
        assert repo.wait_for("digits", 1, State.END, timeout=60)
        store.remove(2)  # withdrawn: the policy falls back to version 1
        assert repo.wait_for("digits", 1, State.AVAILABLE, timeout=60)
        assert repo.wait_for("digits", 2, State.END, timeout=60)
        assert served_version(repo) == 1
    finally:
        repo.stop()


def test_a_specific_policy_warns_of_missing_versions_and_keeps_its_own_loaded(store, tmp_path, caplog):
    """TF Serving's rules for a specific version policy: versions it names that storage lacks are
    warned about (once) while the others are served; a listed version withdrawn from storage stays
    loaded (pinned by the configuration), where a latest policy would fall back."""
    for version in (1, 2):
        store.publish(version)
    with caplog.at_level("WARNING", logger="runtime.repository"):
        repo = repository(store, tmp_path, poll_seconds=0.05, version_policy=Specific(versions=(1, 2, 4)))
    try:
        assert {v for v, s in states(repo).items() if s is State.AVAILABLE} == {1, 2}
        store.remove(1)
        time.sleep(0.5)  # several polls
        assert states(repo)[1] is State.AVAILABLE
        assert served_version(repo, version=1) == 1
    finally:
        repo.stop()
    warnings = [r.getMessage() for r in caplog.records if "not in storage" in r.getMessage()]
    assert warnings == [f"model digits: versions {missing} of its specific version policy are not in storage; "
                        f"serving the others" for missing in ("4", "1, 4")]  # once per change, not per poll


def test_reload_adds_and_removes_models_and_checks_labels(store, tmp_path):
    store.publish(1)
    store.publish(1, name="other")
    repo = repository(store, tmp_path)
    try:
        other = ModelConfig(name="other", base_path=store.base_path("other"))
        repo.reload(ModelConfigList(models=(other,)))
        with repo.hold("other") as handle:
            assert handle.version == 1
        with pytest.raises(NotFound):
            with repo.hold("digits"):
                pass
        assert states(repo) == {1: State.END}
        bad = other.replace(version_labels={"stable": 7})
        with pytest.raises(ConfigError, match="label 'stable' cannot be assigned to version 7"):
            repo.reload(ModelConfigList(models=(bad,)))
    finally:
        repo.stop()


def test_hot_swap_under_load_fails_no_request(store, tmp_path):
    """Requests run continuously while version 2 is published and version 1 removed: none fails,
    and every answer comes from a version that was AVAILABLE when the request held it."""
    store.publish(1)
    repo = repository(store, tmp_path, poll_seconds=0.05)
    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                with repo.hold("digits") as handle:
                    assert repo.status("digits", handle.version).versions[0].state in (State.AVAILABLE, State.UNLOADING)
                    handle.engine.run("serving_default", IMAGES)
                    answers.append(handle.version)
            except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                failures.append(repr(e))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.3)
        store.publish(2)
        assert repo.wait_for("digits", 2, State.AVAILABLE, timeout=60)
        store.remove(1)
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


@pytest.fixture
def own_s3(s3_env):
    """An S3 server of this test's own, so the test can take it away."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3_env(f"http://{host}:{port}")
    client = boto3.client("s3")
    client.create_bucket(Bucket="models")
    yield server, client
    server.stop()


def test_unreachable_store_is_reported_and_serving_goes_on(own_s3, digits, tmp_path):
    server, client = own_s3
    store = Store(digits, None, client, "models")
    store.publish(1)
    repo = repository(store, tmp_path)
    try:
        assert served_version(repo) == 1
        server.stop()
        repo.poll()
        status = repo.status("digits")
        assert "cannot read versions of model digits" in status.error
        assert "failed after 3 attempt(s)" in status.error
        assert [(v.version, v.state) for v in status.versions] == [(1, State.AVAILABLE)]
        assert served_version(repo) == 1
    finally:
        repo.stop()


def test_two_loads_of_one_version_share_one_download(bucket, digits, tmp_path, monkeypatch):
    from runtime.storage import S3Storage

    client, name = bucket
    store = Store(digits, None, client, name)
    store.publish(1)
    downloads = []
    original = S3Storage.download
    monkeypatch.setattr(S3Storage, "download",
                        lambda self, key, dest, size=None: (downloads.append(key), original(self, key, dest, size))[1])
    cache = ServableCache(tmp_path / "cache")
    config = ModelConfigList(models=(ModelConfig(name="digits", base_path=store.base_path()),))
    repos = [Repository(config, poll_seconds=0, cache=cache, retry=FAST) for _ in range(2)]
    starters = [threading.Thread(target=repo.start) for repo in repos]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join()
    try:
        for repo in repos:
            assert served_version(repo) == 1
        files = [f for f in digits.servable.rglob("*") if f.is_file() and f.name != "manifest.json"]
        assert sorted(downloads) == sorted(f"digits/1/{f.relative_to(digits.servable)}" for f in files)
    finally:
        for repo in repos:
            repo.stop()


def test_cache_evicts_unloaded_versions_never_the_serving_one(bucket, digits, tmp_path):
    client, name = bucket
    store = Store(digits, None, client, name)
    size = sum(f.stat().st_size for f in digits.servable.rglob("*") if f.is_file())
    cache = ServableCache(tmp_path / "cache", max_bytes=int(size * 2.5))
    config = ModelConfigList(models=(ModelConfig(name="digits", base_path=store.base_path()),))
    repo = Repository(config, poll_seconds=0, cache=cache, retry=FAST)
    store.publish(1)
    repo.start()
    try:
        for version in (2, 3):
            store.publish(version)
            repo.poll()
            assert served_version(repo) == version
        cached = sorted(p.name for p in (tmp_path / "cache").glob("*/digits/*"))
        assert cached == ["2", "3"], "version 1, unloaded and least recently used, was evicted"
    finally:
        repo.stop()
