"""Model configuration: TF Serving's models.config text format, the same structure in YAML and
JSON, one model from flags, and a clear ConfigError for everything that cannot be served."""

from __future__ import annotations

import textwrap

import orjson
import pytest
import yaml
from google.protobuf import json_format, text_format

from runtime.errors import ConfigError
from runtime.model_config import (ModelConfig, ModelConfigList, check_version_labels, format_of,
                                  from_proto, load_model_config, parse_model_config, single_model)
from runtime.protos import generated_module
from runtime.version_policy import All, Latest, Specific

# As in TF Serving's documentation (serving_config.md), one model per policy.
MODELS_CONFIG = textwrap.dedent("""\
    model_config_list {
      config {
        name: 'my_first_model'
        base_path: '/tmp/my_first_model/'
        model_platform: 'tensorflow'
        model_version_policy {
          specific {
            versions: 42
            versions: 43
          }
        }
        version_labels {
          key: 'stable'
          value: 42
        }
        version_labels {
          key: 'canary'
          value: 43
        }
      }
      config {
        name: 'my_second_model'
        base_path: 's3://bucket/models/my_second_model'
        model_platform: 'tensorflow'
        model_version_policy: { all: {} }
      }
      config {
        name: 'my_third_model'
        base_path: 'gs://bucket/models/my_third_model'
        model_platform: 'kiln'
        model_version_policy { latest { num_versions: 2 } }
        version_labels { key: 'stable' value: 7 }
      }
      config {
        name: 'plain'
        base_path: '/models/plain'
      }
    }
    """)

EXPECTED = ModelConfigList(models=(
    ModelConfig(name="my_first_model", base_path="/tmp/my_first_model/",
                version_policy=Specific(versions=(42, 43)), version_labels={"stable": 42, "canary": 43}),
    ModelConfig(name="my_second_model", base_path="s3://bucket/models/my_second_model",
                version_policy=All()),
    ModelConfig(name="my_third_model", base_path="gs://bucket/models/my_third_model",
                model_platform="kiln", version_policy=Latest(num_versions=2),
                version_labels={"stable": 7}),
    ModelConfig(name="plain", base_path="/models/plain"),
))

AS_MAPPING = {"model_config_list": [
    {"name": "my_first_model", "base_path": "/tmp/my_first_model/", "model_platform": "tensorflow",
     "model_version_policy": {"specific": {"versions": [42, 43]}},
     "version_labels": {"stable": 42, "canary": 43}},
    {"name": "my_second_model", "base_path": "s3://bucket/models/my_second_model",
     "model_platform": "tensorflow", "model_version_policy": {"all": {}}},
    {"name": "my_third_model", "base_path": "gs://bucket/models/my_third_model", "model_platform": "kiln",
     "model_version_policy": {"latest": {"num_versions": 2}}, "version_labels": {"stable": 7}},
    {"name": "plain", "base_path": "/models/plain"},
]}


def server_config():
    return generated_module("tensorflow_serving.config.model_server_config_pb2").ModelServerConfig()


def test_text_format():
    assert parse_model_config(MODELS_CONFIG, "text") == EXPECTED
    assert parse_model_config(MODELS_CONFIG.encode(), "text") == EXPECTED


def test_yaml_and_json_give_the_same_models():
    assert parse_model_config(yaml.safe_dump(AS_MAPPING), "yaml") == EXPECTED
    assert parse_model_config(orjson.dumps(AS_MAPPING), "json") == EXPECTED


def test_protobuf_json_mapping_is_accepted_too():
    """What protobuf's own tools write for the message (model_config_list.config, camelCase)."""
    written = json_format.MessageToJson(text_format.Parse(MODELS_CONFIG, server_config()))
    assert '"modelConfigList"' in written
    assert parse_model_config(written, "json") == EXPECTED
    assert parse_model_config(written, "yaml") == EXPECTED  # JSON is YAML


def test_text_round_trip_through_the_message():
    message = text_format.Parse(MODELS_CONFIG, server_config())
    written = text_format.MessageToString(message)
    again = text_format.Parse(written, server_config())
    assert again == message
    assert from_proto(again) == EXPECTED
    binary = server_config()
    binary.ParseFromString(message.SerializeToString())
    assert binary == message


@pytest.mark.parametrize("suffix, text", [
    (".config", MODELS_CONFIG), (".pbtxt", MODELS_CONFIG), (".txt", MODELS_CONFIG),
    (".yaml", yaml.safe_dump(AS_MAPPING)), (".yml", yaml.safe_dump(AS_MAPPING)),
    (".json", orjson.dumps(AS_MAPPING).decode()),
])
def test_load_by_extension(tmp_path, suffix, text):
    path = tmp_path / f"models{suffix}"
    path.write_text(text)
    assert load_model_config(path) == EXPECTED
    assert load_model_config(str(path)) == EXPECTED


def test_format_of_urls_and_unknown_extensions():
    assert format_of("s3://bucket/config/models.config") == "text"
    assert format_of("gs://bucket/MODELS.YAML") == "yaml"
    with pytest.raises(ConfigError, match=r"models\.toml: cannot tell the configuration format .*'\.toml'"):
        format_of("models.toml")
    with pytest.raises(ConfigError, match=r"'\(none\)'"):
        load_model_config("models")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the model config file .*nope\.config: No such file"):
        load_model_config(tmp_path / "nope.config")


def test_defaults_as_tf_serving_reads_them():
    """No policy, and latest without num_versions or with 0, all mean the latest version only."""
    for policy in ["", "model_version_policy {}", "model_version_policy { latest {} }",
                   "model_version_policy { latest { num_versions: 0 } }"]:
        parsed = parse_model_config(
            f"model_config_list {{ config {{ name: 'm' base_path: '/m' {policy} }} }}", "text")
        assert parsed.models[0].version_policy == Latest(num_versions=1)
        assert parsed.models[0].model_platform == "tensorflow"


def test_deprecated_model_type_tensorflow():
    parsed = parse_model_config("model_config_list { config { name: 'm' base_path: '/m' "
                                "model_type: TENSORFLOW } }", "text")
    assert parsed.models[0].model_platform == "tensorflow"


@pytest.mark.parametrize("text", ["", "# nothing\n", "model_config_list {}"])
def test_empty_configuration_serves_nothing(text):
    """TF Serving takes no action for an empty config; neither is an error."""
    assert parse_model_config(text, "text") == ModelConfigList()


@pytest.mark.parametrize("text", ["", "{}", "model_config_list: []"])
def test_empty_yaml(text):
    assert parse_model_config(text, "yaml") == ModelConfigList()


def test_single_model_from_flags(tmp_path, monkeypatch):
    assert single_model("m", "s3://bucket/models/m") == ModelConfigList(
        models=(ModelConfig(name="m", base_path="s3://bucket/models/m"),))
    monkeypatch.chdir(tmp_path)
    assert single_model("m", "servables/m").models[0].base_path == str(tmp_path / "servables" / "m")
    with pytest.raises(ConfigError, match="--model_name/--model_base_path: name: is missing"):
        single_model("", "/m")
    with pytest.raises(ConfigError, match="--model_name/--model_base_path: base_path: is missing"):
        single_model("m", "")


def model(body: str) -> str:
    return f"model_config_list {{\n  config {{\n    {body}\n  }}\n}}\n"


TEXT_ERRORS = [
    # malformed: the parser's line and column
    ("model_config_list {\n  config {\n    name: 'm'\n", r"models\.config:3:11: Expected \"}\""),
    (model("name: m"), r"models\.config:3:11: .*Expected string but found: 'm'"),
    (model("name: 'm' model_version_policy { latest { num_versions: -1 } }"),
     r"models\.config:3:\d+: .*Value out of range: -1"),
    (model("name: 'm' base_path: '/m' model_version_policy { latest {} all {} }"),
     r"models\.config:3:\d+: .*\"all\" is specified along with field \"latest\""),
    # unknown or repeated field
    (model("name: 'm'\n    nme: 'x'"), r"models\.config:4:5: .*ModelConfig\" has no field named \"nme\""),
    (model("name: 'm'\n    name: 'n'"), r"models\.config:4:11: .*should not have multiple \"name\" fields"),
    (model("name: 'm' base_path: '/m'") + model("name: 'n' base_path: '/n'"),
     r"models\.config:6:19: .*should not have multiple \"model_config_list\" fields"),
    # what TF Serving refuses
    ("model_config_list { config { name: 'm' base_path: '/m' } config { name: 'm' base_path: '/n' } }",
     r"models\.config: model 'm' is listed more than once"),
    (MODELS_CONFIG.replace("'plain'", "'my_first_model'"),
     r"model 'my_first_model' is listed more than once"),
    (model("base_path: '/m'"), r"models\.config: model_config_list\.config\[0\]: name: is missing"),
    (model("name: 'm'"), r"config\[0\] \(model 'm'\): base_path: is missing"),
    (model("name: 'm' base_path: 'models/m'"),
     r"config\[0\] \(model 'm'\): base_path: must be an absolute path or a URL .*got 'models/m'"),
    (model("name: 'm' base_path: '/m' model_platform: 'pytorch'"),
     r"model_platform: must be 'tensorflow' or 'kiln', got 'pytorch'"),
    (model("name: 'm' base_path: '/m' model_type: TENSORFLOW model_platform: 'tensorflow'"),
     r"sets both model_platform and the deprecated model_type"),
    (model("name: 'm' base_path: '/m' model_type: OTHER"), r"model_type OTHER is not supported"),
    ("custom_model_config { type_url: 'type.googleapis.com/x.Y' }",
     r"models\.config: custom_model_config is not supported"),
    # labels that can never be served, and other Kiln checks
    (model("name: 'm' base_path: '/m' model_version_policy { specific { versions: 1 } } "
           "version_labels { key: 'stable' value: 2 }"),
     r"\(model 'm'\): version_labels: label 'stable' points to version 2, which the specific policy "
     r"does not list \(versions \[1\]\)"),
    (model("name: 'm' base_path: '/m' version_labels { key: 'stable' value: -3 }"),
     r"label 'stable' points to version -3; versions are numbered from 0"),
    (model("name: 'm' base_path: '/m' model_version_policy { specific {} }"),
     r"version_policy\.specific\.versions: lists no versions"),
    (model("name: 'm' base_path: '/m' logging_config {}"), r"logging_config is not supported"),
]


@pytest.mark.parametrize("text, message", TEXT_ERRORS)
def test_text_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_model_config(text, "text", source="models.config")


def test_not_utf8():
    with pytest.raises(ConfigError, match=r"models\.config: is not UTF-8 text \(byte 19\)"):
        parse_model_config(b"model_config_list {\xff}", "text", source="models.config")


MAPPING_ERRORS = [
    ("[1, 2]", r"expected a mapping with model_config_list at the top, got list"),
    ("model_config_list: [{name: m, base_path: /m, nme: x}]", r"has no field named \"nme\""),
    ("model_config_list: [{name: m, base_path: /m, version_labels: {stable: x}}]",
     r"Failed to parse version_labels field"),
    ("model_config_list: [{name: m, base_path: /m}, {name: m, base_path: /n}]",
     r"model 'm' is listed more than once"),
    ("model_config_list: [{base_path: /m}]", r"config\[0\]: name: is missing"),
    ("model_config_list: [{name: m, base_path: /m, model_platform: onnx}]",
     r"model_platform: must be 'tensorflow' or 'kiln', got 'onnx'"),
    ("custom_model_config: {}", r"custom_model_config is not supported"),
    ("model_config_list: [{name: m, base_path: /m, model_version_policy: {specific: {versions: [1]}}, "
     "version_labels: {canary: 2}}]", r"label 'canary' points to version 2, which the specific policy"),
    ("model_config_list: [{name: m, base_path: /m, model_version_policy: {latest: {}, all: {}}}]",
     r"multiple \"policy_choice\" oneof fields"),
]


@pytest.mark.parametrize("text, message", MAPPING_ERRORS)
def test_yaml_errors(text, message):
    with pytest.raises(ConfigError, match=r"^models\.yaml: (?s:.*)" + message):
        parse_model_config(text, "yaml", source="models.yaml")


@pytest.mark.parametrize("text, message", MAPPING_ERRORS)
def test_json_errors(text, message):
    as_json = orjson.dumps(yaml.safe_load(text))
    with pytest.raises(ConfigError, match=r"^models\.json: (?s:.*)" + message):
        parse_model_config(as_json, "json", source="models.json")


def test_malformed_yaml_and_json():
    with pytest.raises(ConfigError, match=r"models\.yaml: is not valid YAML: (?s:.*)line 2, column 1"):
        parse_model_config("model_config_list: [\n", "yaml", source="models.yaml")
    with pytest.raises(ConfigError, match=r"models\.json: is not valid JSON: .*line 1 column 23"):
        parse_model_config('{"model_config_list": ', "json", source="models.json")


def test_config_errors_are_kiln_errors_not_crashes():
    """Whatever YAML produces (dates, numbers as names, nested junk) ends in a ConfigError."""
    for text in ["model_config_list: [{name: 2024-01-01, base_path: /m}]",
                 "model_config_list: [{name: m, base_path: /m, version_labels: {1: 2}}]",
                 "model_config_list: {config: 3}", "model_config_list: [[1]]", "42",
                 "model_config_list: [{name: m, base_path: /m, model_version_policy: {specific: "
                 "{versions: [1.5]}}}]"]:
        with pytest.raises(ConfigError):
            parse_model_config(text, "yaml")


def test_check_version_labels_as_tf_serving_on_reload():
    config = ModelConfig(name="m", base_path="/m", version_policy=All(),
                         version_labels={"stable": 1, "canary": 2})
    check_version_labels(config, available={1, 2}, current={})
    with pytest.raises(ConfigError, match=r"model 'm': label 'canary' cannot be assigned to version 2, "
                                          r"which is not available for inference \(available: \[1\]\)"):
        check_version_labels(config, available={1}, current={})
    # --allow_version_labels_for_unavailable_models: new labels, or labels kept where they are, may
    # point to a version not yet available; moving a label needs an available target.
    check_version_labels(config, available={1}, current={}, allow_unavailable=True)
    check_version_labels(config, available={1}, current={"canary": 2}, allow_unavailable=True)
    with pytest.raises(ConfigError, match="label 'canary' cannot be assigned to version 2"):
        check_version_labels(config, available={1}, current={"canary": 1}, allow_unavailable=True)
    with pytest.raises(ConfigError, match=r"\(available: none\)"):
        check_version_labels(config, available=set(), current={})
