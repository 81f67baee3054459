"""Changing what a server serves needs an administrator: ModelService/HandleReloadConfigRequest over
a real `kiln serve`, spoken to with tensorflow-serving-api's stubs, under each reload policy
(KILN_RELOAD admin, off, open), with tenants' keys (KILN_API_KEYS) and administrators' keys
(KILN_ADMIN_KEYS); a reload may name only base paths under the allowed roots; a configuration with
nothing to serve is not ready (REST and gRPC); settings that cannot work refuse to start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, free_port, kiln_serve

pytest.importorskip("tensorflow_serving")
grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")

from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2,  # noqa: E402
                                     model_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402

TENANTS = {"acme": "acme-tenant-key-0123", "other": "other-tenant-key-4567"}
ADMIN = "admin-key-89ab"
API_KEYS = ",".join(f"{tenant}:{key}" for tenant, key in TENANTS.items())
MODELS = ("half_plus_two", "digits")


def bearer(key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")] if key else []


def config(*models: tuple[str, str]) -> model_management_pb2.ReloadConfigRequest:
    """A ReloadConfigRequest listing (name, base_path) pairs."""
    message = model_server_config_pb2.ModelServerConfig()
    message.model_config_list.SetInParent()
    for name, base_path in models:
        message.model_config_list.config.add(name=name, base_path=str(base_path), model_platform="tensorflow")
    return model_management_pb2.ReloadConfigRequest(config=message)


def reload(channel, request, key: str | None):
    return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
        request, metadata=bearer(key), timeout=60)


def refused(channel, request, key: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        reload(channel, request, key)
    return raised.value


def available(channel, name: str, key: str | None) -> bool:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    try:
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, metadata=bearer(key),
                                                                                 timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        return False
    return any(v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE for v in status.model_version_status)


def served_to_every_tenant(channel, url: str, names=MODELS) -> None:
    for key in TENANTS.values():
        assert all(available(channel, name, key) for name in names)
        answer = httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0, 2.0]},
                            headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 200 and answer.json() == {"predictions": [2.5, 3.0]}


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    """(channel, REST URL, repository root, gRPC address) of a server with two tenants and an administrator."""
    grpc_port = free_port()
    root = tmp_path_factory.mktemp("repository")
    with kiln_serve(examples, root, "--grpc-port", str(grpc_port),
                    env={"KILN_API_KEYS": API_KEYS, "KILN_ADMIN_KEYS": f"ops:{ADMIN}"}) as (_, url):
        address = f"127.0.0.1:{grpc_port}"
        channel = grpc.insecure_channel(address)
        yield channel, url, root, address
        channel.close()


def both(root):
    return config(*((name, root / name) for name in MODELS))


def test_reload_without_a_key_is_unauthenticated(server):
    channel, url, root, _ = server
    error = refused(channel, config(("half_plus_two", root / "half_plus_two")), None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    served_to_every_tenant(channel, url)


def test_a_tenants_key_cannot_change_what_every_tenant_is_served(server):
    channel, url, root, _ = server
    for key in TENANTS.values():
        error = refused(channel, config(("half_plus_two", root / "half_plus_two")), key)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        assert "KILN_ADMIN_KEYS" in error.details() and key not in error.details()
    served_to_every_tenant(channel, url)


def test_the_administrators_key_reloads_and_serves_nothing_else(server):
    channel, url, root, _ = server
    assert reload(channel, config(("half_plus_two", root / "half_plus_two")), ADMIN).status.error_code == 0
    assert not available(channel, "digits", TENANTS["acme"]) and available(channel, "half_plus_two", TENANTS["acme"])
    assert reload(channel, both(root), ADMIN).status.error_code == 0
    served_to_every_tenant(channel, url)
    # An administrator's key is for administration only: it names no tenant.
    answer = httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0]},
                        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert answer.status_code == 403 and "administrator" in answer.json()["error"]


def test_a_reload_names_only_base_paths_under_the_allowed_roots(server, examples, tmp_path_factory):
    channel, url, root, _ = server
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # a sibling of root, holding a real servable
    shutil.copytree(examples["half_plus_two"].servable, elsewhere / "half_plus_two" / "1")
    lookalike = root.parent / f"{root.name}-evil"  # shares root's name as a string prefix
    shutil.copytree(examples["half_plus_two"].servable, lookalike / "half_plus_two" / "1")
    linked = root / "linked"  # inside root by name, elsewhere in fact
    linked.symlink_to(elsewhere, target_is_directory=True)
    try:
        for base_path in (elsewhere / "half_plus_two", f"{root}/../{elsewhere.name}/half_plus_two",
                          lookalike / "half_plus_two", linked / "half_plus_two", "s3://bucket/models/half_plus_two"):
            error = refused(channel, config(("half_plus_two", base_path), ("digits", root / "digits")), ADMIN)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (base_path, error.details())
            assert str(base_path) in error.details() and str(root.resolve()) in error.details()
            served_to_every_tenant(channel, url)  # nothing changed
        # A path that only looks like an escape, but resolves inside the root, is allowed.
        inside = config(("half_plus_two", f"{root}/digits/../half_plus_two"), ("digits", root / "digits"))
        assert reload(channel, inside, ADMIN).status.error_code == 0
        served_to_every_tenant(channel, url)
    finally:
        linked.unlink()
        assert reload(channel, both(root), ADMIN).status.error_code == 0


def test_nothing_to_serve_is_not_ready_over_rest_and_grpc(server):
    channel, url, root, address = server
    triton = grpcclient.InferenceServerClient(address)
    headers = {"authorization": f"Bearer {TENANTS['acme']}"}
    try:
        assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
        assert triton.is_server_ready(headers=headers)
        assert reload(channel, config(), ADMIN).status.error_code == 0
        answer = httpx.get(f"{url}/v2/health/ready")
        assert answer.status_code == 503 and answer.json() == {"ready": False}
        assert not triton.is_server_ready(headers=headers)
    finally:
        assert reload(channel, both(root), ADMIN).status.error_code == 0
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True} and triton.is_server_ready(headers=headers)
    triton.close()


def test_a_configuration_without_models_is_not_ready():
    from runtime.app import App

    class NoModels:
        def names(self) -> list[str]:
            return []

    assert not App(NoModels(), metrics=object()).ready()


def test_with_only_tenants_keys_reload_is_refused(examples, tmp_path):
    grpc_port = free_port()
    with kiln_serve(examples, tmp_path, "--grpc-port", str(grpc_port), env={"KILN_API_KEYS": API_KEYS}) as (_, url):
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            error = refused(channel, config(("digits", tmp_path / "digits")), TENANTS["acme"])
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "KILN_ADMIN_KEYS" in error.details()  # says how to enable it
            served_to_every_tenant(channel, url)


def test_reload_off_refuses_even_an_administrator(examples, tmp_path):
    grpc_port = free_port()
    with kiln_serve(examples, tmp_path, "--grpc-port", str(grpc_port), "--reload", "off",
                    env={"KILN_ADMIN_KEYS": ADMIN}) as _:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            error = refused(channel, config(("digits", tmp_path / "digits")), ADMIN)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "off" in error.details()
            assert available(channel, "half_plus_two", None)


def _serve_refused(tmp_path, *args: str, **env: str) -> str:
    """`kiln serve` that must refuse to start: its stderr."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(tmp_path),
                             "--grpc-port", "0", "--rest-port", str(free_port()), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env={**environ, **env})
    assert result.returncode == 1, result.stderr
    return result.stderr


def test_settings_that_cannot_work_refuse_to_start(tmp_path):
    stderr = _serve_refused(tmp_path, "--redis-url", "redis://127.0.0.1:1/0")
    assert "KILN_SESSION_KEY" in stderr and "secrets.token_hex(32)" in stderr
    stderr = _serve_refused(tmp_path, KILN_API_KEYS=API_KEYS, KILN_RELOAD="open")
    assert "KILN_RELOAD=open" in stderr and "KILN_API_KEYS" in stderr
    stderr = _serve_refused(tmp_path, KILN_API_KEYS=API_KEYS, KILN_ADMIN_KEYS=f"ops:{TENANTS['acme']}")
    assert "KILN_ADMIN_KEYS" in stderr and TENANTS["acme"] not in stderr
