"""The list of models Kiln serves, from TensorFlow Serving's models.config (protobuf text format),
from YAML or JSON of the same structure, or for one model from flags.

Every form is parsed into the generated ModelServerConfig message first and converted by one
function, so the forms cannot drift apart and a file written for TensorFlow Serving means the same
here. YAML and JSON follow protobuf's JSON mapping of that message (field names as in the text
format), with one shorthand: `model_config_list` may be the list of models itself:

    {"model_config_list": [{"name": "m", "base_path": "s3://bucket/models/m",
                            "model_version_policy": {"latest": {"num_versions": 2}},
                            "version_labels": {"stable": 1}}]}

Checks made as TensorFlow Serving makes them (tensorflow_serving/model_servers/server_core.cc,
ValidateModelConfigList and GetPlatform): a model listed twice; a base_path that is neither an
absolute path nor a URL; model_type (deprecated) set together with model_platform, or set to
anything but TENSORFLOW; custom_model_config (for servers built with a custom loader). Where Kiln
differs: model_platform defaults to "tensorflow" instead of being required, and "kiln" is accepted
too; a specific policy must list at least one version; logging_config is refused as unsupported.

Version labels. TF Serving checks a label against what is being served, not against the file
(ServerCore::UpdateModelVersionLabelMap): when a configuration is (re)loaded, every label must
point to a version that is AVAILABLE at that moment, except that with
--allow_version_labels_for_unavailable_models a new label, or one that keeps its version, may point
to a version not yet available; moving an existing label always needs an AVAILABLE target. That is
`check_version_labels`, for the repository to call with the current states. A file alone is refused
only where a label can never be satisfied: a negative version, or one a specific policy does not
list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Literal

import msgspec
import orjson

from runtime.errors import ConfigError, KilnError
from runtime.record import Record, problem
from runtime.version_policy import All, Latest, Specific, VersionPolicy

Format = Literal["text", "yaml", "json"]
FORMATS: dict[str, Format] = {
    ".config": "text",
    ".pbtxt": "text",
    ".txt": "text",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PLATFORMS = ("tensorflow", "kiln")


class ModelConfig(Record, frozen=True):
    """One model: where its versions are (BASE/NAME, holding VERSION/ directories), which of them
    to serve, and names for some of them."""

    name: str
    base_path: str
    model_platform: str = "tensorflow"  # one of PLATFORMS: checked below, to list them in the error
    version_policy: VersionPolicy = Latest()
    version_labels: dict[str, int] = msgspec.field(default_factory=dict)
    # Kiln's extension, YAML and JSON only: this model's batching parameters (runtime.batching)
    # over the server's.
    batching_parameters: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        """The checks name their field themselves: msgspec places an error raised here at the
        record, not at a field."""
        super().__post_init__()
        if not self.name:
            raise ValueError("name: is missing")
        if not self.base_path:
            raise ValueError("base_path: is missing")
        if not (_URL.match(self.base_path) or os.path.isabs(self.base_path)):
            raise ValueError(
                f"base_path: must be an absolute path or a URL such as s3://bucket/models/NAME, got {self.base_path!r}"
            )
        if self.model_platform not in PLATFORMS:
            allowed = " or ".join(map(repr, PLATFORMS))
            raise ValueError(f"model_platform: must be {allowed}, got {self.model_platform!r}")
        for label, version in self.version_labels.items():
            if version < 0:
                raise ValueError(
                    f"version_labels: label {label!r} points to version {version}; versions are numbered from 0"
                )
            if isinstance(self.version_policy, Specific) and version not in self.version_policy.versions:
                raise ValueError(
                    f"version_labels: label {label!r} points to version {version}, which the specific "
                    f"policy does not list (versions {list(self.version_policy.versions)})"
                )


class ModelConfigList(Record, frozen=True):
    models: tuple[ModelConfig, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [model.name for model in self.models]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"model {repeated[0]!r} is listed more than once; names must be unique")


def load_model_config(location: str | Path) -> ModelConfigList:
    """Read a configuration file, a local path or in a store (s3://, gs://), its format chosen by its
    extension (KILN_MODEL_CONFIG_FILE, --model_config_file)."""
    from runtime.storage import open_storage, split_location

    location = str(location)
    format = format_of(location)
    if "://" in location:
        parent, name = split_location(location)
        try:
            data = open_storage(parent).read_bytes(name)
        except KilnError as e:
            raise ConfigError(f"cannot read the model config file {location}: {e}") from None
    else:
        try:
            data = Path(location).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read the model config file {location}: {e.strerror}") from None
    return parse_model_config(data, format, source=location)


def format_of(path: str | Path) -> Format:
    """The format a file name (or URL) implies: .config/.pbtxt/.txt, .yaml/.yml, .json."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"{path}: cannot tell the configuration format from the extension "
            f"{suffix or '(none)'!r}; expected one of {', '.join(FORMATS)}"
        )
    return FORMATS[suffix]


def parse_model_config(data: bytes | str, format: Format, source: str = "<config>") -> ModelConfigList:
    """Parse configuration text read from anywhere (a file, object storage, a request); `source`
    names it in error messages."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: is not UTF-8 text (byte {e.start})") from None
    if format == "text":
        return from_proto(_parse_text(data, source), source)
    mapping, batching = _batching_parameters(_load_mapping(data, format, source), source)
    config = from_proto(_parse_mapping(mapping, source), source)
    return config.replace(
        models=tuple(model.replace(batching_parameters=batching.get(model.name, {})) for model in config.models)
    )


def single_model(name: str, base_path: str) -> ModelConfigList:
    """One model from flags (TF Serving's --model_name and --model_base_path), its latest version.
    A relative local path is taken from the current directory, as a shell user means it."""
    if base_path and not _URL.match(base_path):
        base_path = os.path.abspath(base_path)
    try:
        return ModelConfigList(models=(ModelConfig(name=name, base_path=base_path),))
    except ValueError as e:
        raise ConfigError(f"--model_name/--model_base_path: {problem(e)}") from None


def from_proto(message: Any, source: str = "<ModelServerConfig>") -> ModelConfigList:
    """Convert a ModelServerConfig message (parsed here, or received by HandleReloadConfigRequest)."""
    if message.WhichOneof("config") == "custom_model_config":
        raise ConfigError(
            f"{source}: custom_model_config is not supported; Kiln serves the models of a model_config_list"
        )
    models = []
    for index, model in enumerate(message.model_config_list.config):
        where = f"{source}: model_config_list.config[{index}]"
        models.append(_model_from_proto(model, f"{where} (model {model.name!r})" if model.name else where))
    try:
        return ModelConfigList(models=tuple(models))
    except ValueError as e:
        raise ConfigError(f"{source}: {problem(e)}") from None


def check_version_labels(
    model: ModelConfig, available: set[int], current: Mapping[str, int], allow_unavailable: bool = False
) -> None:
    """TF Serving's rule for accepting a configuration's labels now: each must point to an
    AVAILABLE version; with `allow_unavailable` (--allow_version_labels_for_unavailable_models)
    a label that is new or keeps its version (`current`: the labels in force) may point elsewhere."""
    for label, version in model.version_labels.items():
        if version in available or (allow_unavailable and current.get(label, version) == version):
            continue
        raise ConfigError(
            f"model {model.name!r}: label {label!r} cannot be assigned to version {version}, which is "
            f"not available for inference (available: {sorted(available) or 'none'})"
        )


def _messages() -> ModuleType:
    """The generated model_server_config_pb2, imported only when a configuration is parsed."""
    from runtime.protos import generated_module

    return generated_module("tensorflow_serving.config.model_server_config_pb2")


def _parse_text(text: str, source: str) -> Any:
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _messages().ModelServerConfig())
    except text_format.ParseError as e:
        line, column = e.GetLine(), e.GetColumn()
        reason = str(e).removeprefix(f"{line}:{column} : ")
        raise ConfigError(f"{source}:{line}:{column}: {reason}") from None


def _load_mapping(text: str, format: Format, source: str) -> Any:
    if format == "json":
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise ConfigError(f"{source}: is not valid JSON: {e}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: is not valid YAML: {e}") from None


def _batching_parameters(data: Any, source: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Take each model's `batching_parameters` (Kiln's, unknown to ModelServerConfig) out of a
    YAML or JSON configuration, checked; returns the rest and them by model name."""
    from runtime.batching import parse

    models = data.get("model_config_list") if isinstance(data, dict) else None
    if isinstance(models, dict):
        models = models.get("config")
    if not isinstance(models, list):
        return data, {}
    found: dict[str, dict[str, Any]] = {}
    kept: list[Any] = []
    for index, model in enumerate(models):
        if isinstance(model, dict) and "batching_parameters" in model:
            model = dict(model)
            overrides = model.pop("batching_parameters")
            where = f"{source}: model_config_list.config[{index}].batching_parameters"
            if not isinstance(overrides, dict):
                raise ConfigError(f"{where}: expected a mapping of batching parameters")
            parse(overrides, where)
            found[str(model.get("name"))] = overrides
        kept.append(model)
    return {**data, "model_config_list": {"config": kept}}, found


def _parse_mapping(data: Any, source: str) -> Any:
    from google.protobuf import json_format

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with model_config_list at the top, got {type(data).__name__}")
    if isinstance(data.get("model_config_list"), list):
        data = {**data, "model_config_list": {"config": data["model_config_list"]}}
    try:
        return json_format.ParseDict(data, _messages().ModelServerConfig())
    except json_format.ParseError as e:
        raise ConfigError(f"{source}: {e}") from None


def _model_from_proto(model: Any, where: str) -> ModelConfig:
    if model.HasField("logging_config"):
        raise ConfigError(f"{where}: logging_config is not supported by Kiln")
    platform = model.model_platform
    if model.model_type:
        type_name = _messages().ModelType.Name(model.model_type)
        if platform:
            raise ConfigError(f"{where}: sets both model_platform and the deprecated model_type; keep model_platform")
        if type_name != "TENSORFLOW":
            raise ConfigError(f'{where}: model_type {type_name} is not supported; use model_platform: "tensorflow"')
        platform = "tensorflow"
    fields: dict[str, Any] = {
        "name": model.name,
        "base_path": model.base_path,
        "version_policy": _policy_from_proto(model.model_version_policy, where),
        "version_labels": dict(model.version_labels),
    }
    if platform:
        fields["model_platform"] = platform
    try:
        return ModelConfig.parse(fields)
    except ValueError as e:
        raise ConfigError(f"{where}: {problem(e)}") from None


def _policy_from_proto(policy: Any, where: str) -> VersionPolicy:
    """As TF Serving reads it: unset means latest 1, and num_versions 0 counts as 1."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return All()
    if choice == "specific":
        try:
            return Specific(versions=tuple(policy.specific.versions))
        except ValueError as e:  # named by its place in the message, which the policy does not know
            raise ConfigError(f"{where}: version_policy.specific.versions: {e}") from None
    return Latest(num_versions=max(policy.latest.num_versions, 1))
