"""Settings from the environment, the same for every entry point: read and checked at start-up,
with errors that name the variable."""

from __future__ import annotations

import pytest

from runtime.access import Reload, StoreLocation
from runtime.errors import ConfigError, PermissionDenied, Unauthenticated
from runtime.settings import Settings


def test_everything_from_the_environment(tmp_path):
    settings = Settings.from_env({
        "KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_MODEL_NAME": "digits", "KILN_POLL_SECONDS": "0.5",
        "KILN_BATCHING": "fixed", "KILN_MAX_BATCH_SIZE": "8", "KILN_ALLOWED_BATCH_SIZES": "2,4,8",
        "KILN_BATCH_TIMEOUT_MICROS": "500", "KILN_ENABLE_LARGE_BATCH_SPLITTING": "true",
        "KILN_API_KEYS": "acme:k1", "KILN_CORS_ORIGINS": "https://a.example", "KILN_MAX_BODY_BYTES": "1024",
        "KILN_LOG_LEVEL": "WARNING"})
    assert settings.poll_seconds == 0.5 and settings.max_body_bytes == 1024 and settings.log_level == "WARNING"
    batching = settings.batching
    assert (batching.mode, batching.max_batch_size, batching.allowed_batch_sizes, batching.timeout_seconds,
            batching.enable_large_batch_splitting) == ("fixed", 8, (2, 4, 8), 0.0005, True)
    assert settings.auth.keys == (("acme", "k1"),) and settings.cors.origins == ("https://a.example",)
    (model,) = settings.model_config().models
    assert model.name == "digits" and model.base_path == f"{tmp_path}/digits"


def test_flags_override_the_environment_and_the_entry_point_picks_the_default_mode(tmp_path):
    env = {"KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_MAX_BATCH_SIZE": "8"}
    assert Settings.from_env(env, batching_mode="fixed").batching.mode == "fixed"
    settings = Settings.from_env(env, overrides={"max_batch_size": 16, "mode": "off", "batch_timeout_micros": None})
    assert settings.batching.max_batch_size == 16 and settings.batching.mode == "off"


def test_the_batching_parameters_file_in_tf_servings_text_format(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 1000 }\n"
                    "max_enqueued_batches { value: 4 }\nnum_batch_threads { value: 2 }\n"
                    "allowed_batch_sizes: 8\nallowed_batch_sizes: 32\npad_variable_length_inputs: true\n"
                    "thread_pool_name { value: 'ignored' }\n")
    batching = Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path),
                                  "KILN_BATCHING_PARAMETERS_FILE": str(path)}).batching
    assert (batching.max_batch_size, batching.batch_timeout_micros, batching.max_enqueued_batches,
            batching.num_batch_threads, batching.allowed_batch_sizes, batching.pad_variable_length_inputs) == \
        (32, 1000, 4, 2, (8, 32), True)
    path.write_text("max_batch_size { value: 32 }\nallowed_batch_sizes: 8\n")
    with pytest.raises(ConfigError, match="must equal max_batch_size"):
        Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_BATCHING_PARAMETERS_FILE": str(path)})
    path.write_text("max_batch_sise { value: 32 }\n")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_BATCHING_PARAMETERS_FILE": str(path)})


@pytest.mark.parametrize("env, message", [
    ({}, "no models to serve: set KILN_MODEL_CONFIG_FILE"),
    ({"KILN_MODEL_CONFIG_FILE": "/m.config", "KILN_MODEL_REPOSITORY": "/m"}, "not both"),
    ({"KILN_MODEL_NAME": "digits", "KILN_MODEL_CONFIG_FILE": "/m.config"}, "KILN_MODEL_REPOSITORY, which is not set"),
    ({"KILN_MODEL_REPOSITORY": "/m", "KILN_MAX_BATCH_SIZE": "lots"}, "KILN_MAX_BATCH_SIZE must be an integer, got 'lots'"),
    ({"KILN_MODEL_REPOSITORY": "/m", "KILN_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ({"KILN_MODEL_REPOSITORY": "/m", "KILN_BATCHING": "eager"}, "KILN_BATCHING must be one of adaptive, fixed, off"),
    ({"KILN_MODEL_REPOSITORY": "/m", "KILN_WARMUP_ITERATIONS": "0"}, "KILN_WARMUP_ITERATIONS must be at least 1"),
    ({"KILN_MODEL_REPOSITORY": "/m", "KILN_PAD_VARIABLE_LENGTH_INPUTS": "maybe"}, "must be true or false"),
    ({"KILN_MODEL_REPOSITORY": "/m", "KILN_API_KEYS": "acme:"}, "empty key"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_a_model_config_file_in_s3(bucket, tmp_path):
    client, name = bucket
    client.put_object(Bucket=name, Key="config/models.yaml", Body=b"model_config_list:\n"
                      b"  - {name: digits, base_path: s3://models/digits, batching_parameters: {max_batch_size: 8}}\n")
    (model,) = Settings.from_env({"KILN_MODEL_CONFIG_FILE": f"s3://{name}/config/models.yaml"}).model_config().models
    assert model.base_path == "s3://models/digits" and model.batching_parameters == {"max_batch_size": 8}
    with pytest.raises(ConfigError, match="cannot read the model config file"):
        Settings.from_env({"KILN_MODEL_CONFIG_FILE": f"s3://{name}/config/missing.yaml"}).model_config()
    with pytest.raises(ConfigError, match="batching_parameters: max_batch_sise"):
        client.put_object(Bucket=name, Key="config/bad.yaml", Body=b"model_config_list:\n"
                          b"  - {name: d, base_path: /d, batching_parameters: {max_batch_sise: 8}}\n")
        Settings.from_env({"KILN_MODEL_CONFIG_FILE": f"s3://{name}/config/bad.yaml"}).model_config()


def test_administrators_and_the_reload_policy(tmp_path):
    env = {"KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_API_KEYS": "acme:t1", "KILN_ADMIN_KEYS": "ops:a1,a2"}
    auth = Settings.from_env(env).auth
    assert auth.keys == (("acme", "t1"),) and auth.admin_keys == (("ops", "a1"), ("admin", "a2"))
    assert auth.reload.policy == "admin" and auth.reload.base_paths is None
    assert auth.admin({"authorization": "Bearer a1"}) == "ops" and auth.admin({"x-api-key": "a2"}) == "admin"
    with pytest.raises(Unauthenticated):
        auth.admin({})
    with pytest.raises(PermissionDenied, match="not one"):
        auth.admin({"authorization": "Bearer t1"})  # a tenant's key
    with pytest.raises(PermissionDenied, match="for administration only"):
        auth.tenant({"authorization": "Bearer a1"})  # an administrator's key names no tenant
    assert Settings.from_env(env, overrides={"reload": "off"}).auth.reload.policy == "off"
    with pytest.raises(PermissionDenied, match="KILN_RELOAD=off"):
        Settings.from_env({**env, "KILN_RELOAD": "off"}).auth.admin({"authorization": "Bearer a1"})
    tenants_only = Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_API_KEYS": "acme:t1"}).auth
    with pytest.raises(PermissionDenied, match="set KILN_ADMIN_KEYS"):
        tenants_only.admin({"authorization": "Bearer t1"})
    anyone = Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_RELOAD": "open"}).auth
    assert anyone.admin({}) is None  # TF Serving's own behaviour, where nobody has a key


@pytest.mark.parametrize("env, message", [
    ({"KILN_RELOAD": "sometimes"}, "KILN_RELOAD must be one of admin, off, open, got 'sometimes'"),
    ({"KILN_RELOAD": "open", "KILN_API_KEYS": "acme:t1"}, "KILN_RELOAD=open .* KILN_API_KEYS is set"),
    ({"KILN_RELOAD": "open", "KILN_ADMIN_KEYS": "a1"}, "KILN_ADMIN_KEYS is set but KILN_RELOAD=open"),
    ({"KILN_API_KEYS": "acme:same-key", "KILN_ADMIN_KEYS": "ops:same-key"}, "'ops' is also tenant 'acme'"),
    ({"KILN_ADMIN_KEYS": "ops:"}, "KILN_ADMIN_KEYS: an entry has an empty key"),
    ({"KILN_RELOAD_BASE_PATHS": "ftp://host/models"}, "KILN_RELOAD_BASE_PATHS: 'ftp://host/models' is not"),
    ({"KILN_RELOAD_BASE_PATHS": "s3://b/models/../x"}, "KILN_RELOAD_BASE_PATHS: .*'..'"),
    ({"KILN_REDIS_URL": "redis://127.0.0.1:6379/0"}, "KILN_SESSION_KEY is not set.*secrets.token_hex"),
])
def test_access_settings_that_cannot_work_refuse_to_start(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message) as raised:
        Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path), **env})
    assert "same-key" not in str(raised.value)  # never a key in a message


def test_a_shared_session_store_needs_the_shared_key(tmp_path):
    key = "ab" * 32
    env = {"KILN_MODEL_REPOSITORY": str(tmp_path), "KILN_SESSION_KEY": key}
    assert Settings.from_env({**env, "KILN_REDIS_URL": "redis://127.0.0.1:6379/0"}).redis_url
    with pytest.raises(ConfigError, match="KILN_SESSION_KEY is not set") as raised:  # a flag as well as the variable
        Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path)}, overrides={"redis_url": "redis://h:6379"})
    assert key not in str(raised.value)
    assert Settings.from_env({"KILN_MODEL_REPOSITORY": str(tmp_path)}).redis_url is None  # in process: no key needed


def test_sessions_in_redis_refuse_to_start_without_the_key(monkeypatch):
    from runtime.sessions.services import Sessions

    monkeypatch.delenv("KILN_SESSION_KEY", raising=False)
    with pytest.raises(ConfigError, match="KILN_SESSION_KEY is not set"):
        Sessions("redis://127.0.0.1:6379/0")
    assert Sessions().ids.keys  # in process: a random key of this process, as before


def test_reload_base_paths_compare_whole_segments_of_resolved_paths(tmp_path):
    roots = Reload(base_paths=(StoreLocation.parse("s3://b/models"), StoreLocation.parse(str(tmp_path / "models"))))
    allowed = roots.roots(())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for base_path in ("s3://b/models", "s3://b/models/digits", "s3://b//models/digits/", f"{tmp_path}/models/d",
                      f"{tmp_path}/x/../models/d", f"file://{tmp_path}/models/d"):
        Reload.check_base_paths([base_path], allowed)
    for base_path in ("s3://b/models-evil/digits", "s3://b/model", "s3://other/models/digits", "gs://b/models/d",
                      f"{tmp_path}/models-evil/d", f"{tmp_path}/models/../d", f"{tmp_path}/models/link/d", "/"):
        with pytest.raises(PermissionDenied, match=f"base_path '{base_path}' is outside .*s3://b/models, {tmp_path}"):
            Reload.check_base_paths([base_path], allowed)
    with pytest.raises(ConfigError, match="'..'"):
        Reload.check_base_paths(["s3://b/models/../evil"], allowed)


def test_by_default_a_reload_names_paths_beside_the_models_configured_at_start(tmp_path):
    roots = Reload().roots([f"{tmp_path}/models/digits", "s3://bucket/team/half_plus_two", "s3://bucket/team/other",
                            "gs://top", "s3://solo/digits", "/"])
    assert [str(root) for root in roots] == [f"{tmp_path}/models", "s3://bucket/team", "gs://top", "s3://solo", "/"]
    Reload.check_base_paths([f"{tmp_path}/models/new", "s3://bucket/team/new"], roots)
    with pytest.raises(PermissionDenied):
        Reload.check_base_paths(["s3://bucket/other/new"], roots)


def test_warmup_depth(tmp_path):
    base = {"KILN_MODEL_REPOSITORY": str(tmp_path)}
    assert Settings.from_env(base).warmup == "first"
    assert Settings.from_env({**base, "KILN_WARMUP": "all"}).warmup == "all"
    with pytest.raises(ConfigError, match="KILN_WARMUP must be one of first, all"):
        Settings.from_env({**base, "KILN_WARMUP": "some"})
