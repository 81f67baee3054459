"""The servable manifest: what a servable holds and what it needs, and the checks made before use.

A servable is a directory BASE/NAME/VERSION/ with manifest.json and its artifacts. The manifest is
written last, so a directory without one is not (yet) a servable.

Stateful signatures (format version 1, optional fields; `kiln compile --state`, `--state-capacity`).
A signature's `state` maps each state input to the output that is fed back into it on the next call
of the same session (an RNN's hidden state, a transformer's K/V cache and its position): a request
names a session, its state inputs are loaded from the session store (zeros for a new session), the
request supplies the other inputs, and the paired outputs are saved as the session's new state.
A pair has the same dtype and shape, batch dimension included, so in a batch each row is a session.
A session's state is stored by input name: signatures that share sessions (a prefill, then decode
steps) name their state inputs alike, and the manifest requires those to agree in dtype and shape.
`position`, when set, names the state input that counts the tokens the state holds (integer, one
per row) and the most it can hold: a call whose paired output exceeds `capacity` overflowed the
state, and its results must be refused rather than saved. `appended` (`--state-append`) lists state
inputs whose paired output holds only the entries a call adds (a decode step's new keys and values),
not the whole state: the output has the input's shape except on the axis whose size is the
position's capacity, where it has the entries' count, and the runtime writes them at each row's
position, in place; a decode step then neither reads nor writes the whole cache to move one token's
worth of it. Stateless signatures have `state` {}, `appended` () and `position` null, and leave them
out of manifest.json, which then reads as before: servables
compiled before these fields existed load unchanged, and stateless ones compiled now load in a Kiln
that predates them.

Unknown rank (TF Serving's own half_plus_two: a placeholder with no shape). A TensorSpec's `shape`
is null for a tensor of unknown rank, as TensorFlow's TensorShape(None). A signature whose inputs have
unknown rank or dynamic inner dimensions, and whose outputs are computed from them element by
element (`elementwise`, decided by the compiler from the graph), is compiled over flat runs of
elements: a request's inputs, which must all have one shape (no broadcasting between them), are
flattened, split into and padded to the buckets (counted in elements, not rows), and each output is
reshaped to that shape. Such a signature takes any shape its inputs' declared shapes allow, rank 0
included. `elementwise` is false for every other signature and is then left out of manifest.json.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from msgspec import field

from runtime.cpu import architecture_of
from runtime.errors import ServableError
from runtime.record import Positive, Record, problem

# 2: the bucket libraries link one shared runtime library (Manifest.runtime) and one weights library
# (Manifest.weights) instead of each carrying the AOT runtime and its own constants. Format 1
# servables, whose libraries are self-contained, still load.
# 3: the runtime library is not in the servable but named by its key and checksum, and found installed
# or once per store (runtime/runtime_library.py); a servable compiled with --embed-runtime is format 2.
SHARED_RUNTIME_FORMAT = 3
EMBEDDED_RUNTIME_FORMAT = 2
FORMAT_VERSION = SHARED_RUNTIME_FORMAT
READABLE_FORMATS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"

Engine = Literal["xla-aot", "saved-model"]
ServableEngine = Literal["xla-aot", "saved-model", "mixed"]
DenseDtype = Literal["float32", "int64", "string"]
PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"


class TensorSpec(Record, frozen=True):
    """One input or output. dtype is numpy's name ("float32"), or "string" for bytes; `shape` has
    None where any size is accepted, and is None for a tensor of unknown rank."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None

    @property
    def known_shape(self) -> tuple[int | None, ...]:
        """The shape of a tensor whose rank is known; ValueError for unknown rank, whose shapes cannot
        be made up (an elementwise signature's buffers are runs of elements: Signature.buffer_shape)."""
        if self.shape is None:
            raise ValueError(f"tensor '{self.name}' has unknown rank")
        return self.shape

    def sized(self, size: int) -> tuple[int, ...]:
        """The shape with `size` for every dimension of any size (a bucket's rows)."""
        return tuple(size if d is None else d for d in self.known_shape)


class Position(Record, frozen=True):
    """The state input counting the tokens a session's state holds, and the most it can hold."""

    input: str
    capacity: Positive


class DenseFeature(Record, frozen=True):
    """One dense feature ParseExample reads: its key, dtype ("float32", "int64", "string"), shape per
    example, and default values (flattened; bytes as base64) or None when the feature is required."""

    key: str
    dtype: DenseDtype
    shape: tuple[int, ...]
    default: tuple[float | int | str, ...] | None = None


class HostStep(Record, frozen=True):
    """One step of a host program; `op`, its kind, is its tag in manifest.json."""

    @property
    def op(self) -> str:
        return str(self.__struct_config__.tag)


class ParseExampleStep(HostStep, frozen=True, tag_field="op", tag="parse_example"):
    """ParseExample/ParseExampleV2 over serialized tf.Examples, dense features only."""

    input: str
    outputs: tuple[str, ...]
    dense: tuple[DenseFeature, ...]


class LookupStep(HostStep, frozen=True, tag_field="op", tag="lookup"):
    """LookupTableFindV2 over a static hash table whose keys and values are in `table` (an .npz file
    of the servable, runtime/host_program.py), with the default value for keys it lacks."""

    input: str
    output: str
    table: str
    default: float | int


class HashBucketStep(HostStep, frozen=True, tag_field="op", tag="hash_bucket"):
    """StringToHashBucketFast: TensorFlow's Fingerprint64 of each string modulo `buckets`."""

    input: str
    output: str
    buckets: Positive


class HostProgram(Record, frozen=True):
    """A signature's string-handling front, run on the host before its compiled remainder
    (runtime/host_program.py): steps over named tensors, starting from the signature's inputs;
    `outputs` are the compiled code's inputs, batched like the signature."""

    steps: tuple[ParseExampleStep | LookupStep | HashBucketStep, ...]
    outputs: tuple[TensorSpec, ...]


class Signature(Record, frozen=True, kw_only=True):
    """One callable entry point, TensorFlow Serving's SignatureDef as Kiln runs it.

    When batched, dimension 0 of every input and output is the batch, and a request of any batch
    size is split into and padded to the servable's buckets.
    """

    method: str = PREDICT
    engine: Engine
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool = True
    libraries: dict[int, str] = field(default_factory=dict)  # bucket -> library (xla-aot)
    reason: str = ""  # why this signature is not ahead-of-time compiled
    jit: bool = False  # saved-model: runs under XLA JIT from the prebuilt cache
    state: dict[str, str] = field(default_factory=dict)  # state input -> the output fed back into it
    position: Position | None = None  # the state input counting tokens held, and its capacity
    appended: tuple[str, ...] = ()  # state inputs whose output is only the entries to write at the position
    elementwise: bool = False  # compiled over flat runs of elements (see the module's documentation)
    host: HostProgram | None = None  # xla-aot: the string front run on the host, whose outputs the libraries take

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine == "xla-aot" and not self.libraries:
            raise ValueError("an xla-aot signature needs a library for each bucket")
        if self.elementwise and (self.state or not self.batched):
            raise ValueError("an elementwise signature is batched over its elements and has no state")
        if self.host is not None and (self.engine != "xla-aot" or self.state or self.elementwise or not self.batched):
            raise ValueError("a host program fronts a batched, stateless xla-aot signature")

    def compiled(self) -> Signature:
        """The signature the libraries implement: behind a host program, its outputs as the inputs."""
        if self.host is None:
            return self
        return self.replace(inputs=self.host.outputs, host=None)

    def to_builtins(self) -> dict[str, Any]:
        """A stateless signature is written without the state fields, as before they existed."""
        data = super().to_builtins()
        if not self.state and self.position is None:
            del data["state"], data["position"]
        for name in ("appended", "elementwise", "host"):
            if not data[name]:
                del data[name]
        return data

    @property
    def stateful(self) -> bool:
        return bool(self.state)

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def element_shape(self, elements: int) -> tuple[int, ...]:
        """An elementwise signature's inputs holding `elements` elements: a vector, or a column of
        the inputs' declared rank (1 x ... x 1 after the first axis), so that each input fits."""
        return element_shape(self.inputs, elements)

    def buffer_shape(self, spec: TensorSpec, bucket: int) -> tuple[int, ...]:
        """The shape of a tensor's buffer in the compiled code for `bucket`: a run of `bucket` elements
        (elementwise), else its shape with `bucket` for the batch and any other free dimension."""
        return (bucket,) if self.elementwise else spec.sized(bucket)

    def append_axis(self, name: str) -> int:
        """The axis (batch included) along which an appended state input takes its entries: the one
        where the input's size is the position's capacity and its output's is not (state_problems
        refuses an appended state with no such axis)."""
        held = next(spec for spec in self.inputs if spec.name == name)
        output = next(spec for spec in self.outputs if spec.name == self.state[name])
        return _differing_axes(held.known_shape, output.known_shape)[0]


class Target(Record, frozen=True):
    """The machine code's target: the LLVM triple, the CPU name, the features it needs."""

    triple: str
    cpu: str
    features: tuple[str, ...]


class SharedRuntime(Record, frozen=True):
    """The XLA AOT runtime and Kiln's kernels, linked once for every bucket library of the servable.

    `key` names its TensorFlow version, compiler, flags, target CPU and kernels; `file` is its path
    in the servable, beside the bucket libraries that load it. Embedded (format 2), it is checksummed
    like every file; shared (format 3), it is not in the servable and `size` and `sha256` check the
    copy found installed or in the store (runtime/runtime_library.py).
    """

    key: str
    file: str
    embedded: bool = True  # in the servable (format 2), else found by its key
    size: int = 0  # shared: the library's size
    sha256: str = ""  # shared: the library's sha256
    bytes_saved: int = 0  # about how many bytes format 1 would have needed more

    def to_builtins(self) -> dict[str, Any]:
        """An embedded runtime is written as format 2 wrote it."""
        data = super().to_builtins()
        if self.embedded:
            del data["embedded"], data["size"], data["sha256"]
        return data


class Build(Record, frozen=True, kw_only=True):
    """The compiled code for one more target, so that one servable serves a mixed fleet (x86_64 and
    aarch64 instances under one S3 prefix). The manifest's own target, runtime, weights and signature
    libraries are its first build; each further one keeps its libraries in their own directory
    (lib/TRIPLE/), so each loads its own runtime and weights (rpath $ORIGIN). A machine runs the build
    for its architecture (Manifest.for_architecture)."""

    target: Target
    runtime: SharedRuntime | None = None
    weights: str | None = None
    libraries: dict[str, dict[int, str]]  # signature -> bucket -> library

    def to_builtins(self) -> dict[str, Any]:
        return {**super().to_builtins(), "runtime": self.runtime and self.runtime.to_builtins()}


class FileEntry(Record, frozen=True):
    sha256: str
    size: int


class Manifest(Record, frozen=True, kw_only=True):
    format_version: int = FORMAT_VERSION
    name: str
    version: int
    engine: ServableEngine
    signatures: dict[str, Signature]
    batch_sizes: tuple[int, ...]
    target: Target
    tensorflow_version: str
    runtime: SharedRuntime | None = None  # format 2: the runtime library every bucket links
    weights: str | None = None  # format 2: the library holding each distinct constant once
    files: dict[str, FileEntry]
    builds: tuple[Build, ...] = ()  # the code for further targets (one per architecture)

    def __post_init__(self) -> None:
        super().__post_init__()
        engines = {sig.engine for sig in self.signatures.values()}
        expected = engines.pop() if len(engines) == 1 else "mixed"
        if self.engine != expected:
            raise ValueError(f"engine is '{self.engine}' but its signatures make it '{expected}'")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or min(self.batch_sizes, default=0) < 1:
            raise ValueError(f"batch_sizes must be positive and increasing, got {list(self.batch_sizes)}")
        problems = state_problems(self.signatures)
        if problems:
            raise ValueError("; ".join(problems))
        runtime = self.runtime
        if runtime and not runtime.embedded:
            if runtime.file in self.files or not runtime.sha256 or runtime.size < 1:
                raise ValueError(
                    f"a runtime found by its key ({runtime.key}) is not among the files and has a size and sha256"
                )
            if self.format_version < SHARED_RUNTIME_FORMAT:
                raise ValueError(f"a runtime found by its key needs format_version {SHARED_RUNTIME_FORMAT}")
        compiled = {key for key, sig in self.signatures.items() if sig.engine == "xla-aot"}
        architectures = [architecture_of(self.target.triple)]
        for build in self.builds:
            architectures.append(architecture_of(build.target.triple))
            if set(build.libraries) != compiled:
                raise ValueError(
                    f"the {build.target.triple} build has libraries for {sorted(build.libraries)}, "
                    f"not for the compiled signatures {sorted(compiled)}"
                )
        if len(set(architectures)) < len(architectures):
            raise ValueError(f"two builds for one architecture: {', '.join(architectures)}")
        owners: tuple[Manifest | Build, ...] = (self, *self.builds)  # its own target is its first build
        for owner in owners:
            embedded = owner.runtime.file if owner.runtime and owner.runtime.embedded else None
            for shared in (embedded, owner.weights):
                if shared is not None and self.files and shared not in self.files:
                    raise ValueError(f"shared library {shared} is not among the files")

    @property
    def targets(self) -> tuple[Target, ...]:
        return (self.target, *(build.target for build in self.builds))

    def for_architecture(self, architecture: str) -> Manifest:
        """The manifest as a machine of `architecture` runs it: its build for that architecture as
        the target, runtime, weights and libraries. A servable with compiled code but none for this
        architecture is refused, naming what it was compiled for, before any library is opened."""
        if architecture_of(self.target.triple) == architecture:
            return self
        build = next((build for build in self.builds if architecture_of(build.target.triple) == architecture), None)
        if build is None:
            if all(sig.engine != "xla-aot" for sig in self.signatures.values()):
                return self  # saved-model signatures run anywhere TensorFlow does
            raise ServableError(
                f"servable was compiled for {', '.join(t.triple for t in self.targets)} but this "
                f"machine is {architecture}"
            )
        signatures = {
            key: sig.replace(libraries=build.libraries[key]) if key in build.libraries else sig
            for key, sig in self.signatures.items()
        }
        return self.replace(
            target=build.target, runtime=build.runtime, weights=build.weights, signatures=signatures, builds=()
        )

    def to_builtins(self) -> dict[str, Any]:
        """Written as the format it needs: a manifest without a shared runtime, weights or further
        builds has no such fields, as format 1 and single-target servables were written."""
        data = super().to_builtins()
        data["signatures"] = {key: sig.to_builtins() for key, sig in self.signatures.items()}
        data["runtime"] = self.runtime and self.runtime.to_builtins()
        data["builds"] = [build.to_builtins() for build in self.builds]
        for name in ("runtime", "weights", "builds"):
            if not data[name]:
                del data[name]
        return data

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_builtins(), option=orjson.OPT_INDENT_2)

    def write(self, directory: Path) -> None:
        """Write manifest.json last and atomically: its presence publishes the servable."""
        tmp = directory / f".{MANIFEST_FILE}.tmp"
        tmp.write_bytes(self.to_json())
        tmp.replace(directory / MANIFEST_FILE)


class Stateful(Protocol):
    """What the state checks read of a signature (a manifest's, or the compiler's before it has one)."""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...
    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...
    @property
    def state(self) -> Mapping[str, str]: ...
    @property
    def position(self) -> Position | None: ...
    @property
    def appended(self) -> tuple[str, ...]: ...


def state_problems(signatures: Mapping[str, Stateful]) -> list[str]:
    """Everything wrong with the signatures' state pairings and positions, each naming its signature."""
    problems = []
    shared: dict[str, tuple[str, TensorSpec]] = {}  # state input -> the first signature declaring it
    capacities: dict[str, tuple[str, int]] = {}  # position input -> the first signature declaring it
    for key, signature in signatures.items():
        inputs = {spec.name: spec for spec in signature.inputs}
        outputs = {spec.name: spec for spec in signature.outputs}
        fed: dict[str, str] = {}
        for name, output in signature.state.items():
            pair = f"signature '{key}': state {name}={output}"
            if name not in inputs:
                problems.append(f"{pair}: '{name}' is not an input; the inputs are {', '.join(inputs) or 'none'}")
            elif output not in outputs:
                problems.append(f"{pair}: '{output}' is not an output; the outputs are {', '.join(outputs) or 'none'}")
            elif output in fed:
                problems.append(f"{pair}: output '{output}' is already fed back into input '{fed[output]}'")
            else:
                problem = _pair_problem(inputs[name], outputs[output], signature.position, name in signature.appended)
                if problem:
                    problems.append(f"{pair}: {problem}")
                    continue
                fed[output] = name
                first = shared.setdefault(name, (key, inputs[name]))
                if (first[1].dtype, first[1].shape) != (inputs[name].dtype, inputs[name].shape):
                    problems.append(
                        f"signature '{key}': state input '{name}' is {_describe(inputs[name])} but "
                        f"signature '{first[0]}' has it as {_describe(first[1])}; sessions keep state "
                        f"by input name, so signatures must agree on it"
                    )
        for name in signature.appended:
            if name not in signature.state:
                problems.append(
                    f"signature '{key}': appended state input '{name}' is not one of its state inputs "
                    f"({', '.join(signature.state) or 'none'})"
                )
        position = signature.position
        if position is not None:
            spec = inputs.get(position.input)
            if position.input not in signature.state:
                problems.append(
                    f"signature '{key}': position input '{position.input}' is not one of its state "
                    f"inputs ({', '.join(signature.state) or 'none'})"
                )
            elif spec is not None and (
                spec.dtype not in ("int32", "int64") or spec.shape is None or len(spec.shape) > 1
            ):
                problems.append(
                    f"signature '{key}': position input '{position.input}' is {_describe(spec)}; a "
                    f"position is an int32 or int64 count, one per row"
                )
            first_capacity = capacities.setdefault(position.input, (key, position.capacity))
            if first_capacity[1] != position.capacity:
                problems.append(
                    f"signature '{key}': position '{position.input}' has capacity {position.capacity} "
                    f"but signature '{first_capacity[0]}' gives it {first_capacity[1]}"
                )
    return problems


def _pair_problem(held: TensorSpec, fed: TensorSpec, position: Position | None, appended: bool) -> str:
    """Why output `fed` cannot be fed back into state input `held` (whole, or appended), or ""."""
    if not appended:
        if (held.dtype, held.shape) == (fed.dtype, fed.shape):
            return ""
        return (
            f"the input is {_describe(held)} but the output is {_describe(fed)}; state must keep its dtype and "
            f"shape, batch dimension included"
        )
    if position is None:
        return "an appended state needs a position (--state-capacity) to say where its entries go"
    if held.shape is None or fed.shape is None:
        return f"the input is {_describe(held)} and the output {_describe(fed)}; appended state needs a known rank"
    differ = _differing_axes(held.shape, fed.shape)
    if (
        held.dtype == fed.dtype
        and len(held.shape) == len(fed.shape)
        and len(differ) == 1
        and held.shape[differ[0]] == position.capacity
        and 1 <= (fed.shape[differ[0]] or 0) < position.capacity
    ):
        return ""
    return (
        f"the input is {_describe(held)} but the output is {_describe(fed)}; appended entries keep the state's "
        f"dtype and shape except on the one axis of the capacity ({position.capacity}), where they number "
        f"fewer"
    )


def _differing_axes(held: tuple[int | None, ...], fed: tuple[int | None, ...]) -> list[int]:
    return [axis for axis, (a, b) in enumerate(zip(held, fed)) if a != b]


def element_shape(inputs: tuple[TensorSpec, ...], elements: int) -> tuple[int, ...]:
    """`elements` elements in the one rank the inputs declare (1 when all have unknown rank)."""
    rank = next((len(spec.shape) for spec in inputs if spec.shape is not None), 1)
    return (elements, *(1,) * (rank - 1))


def _describe(spec: TensorSpec) -> str:
    return f"{spec.dtype}{show_shape(spec.shape)}"


def show_shape(shape: Sequence[int | None] | None) -> str:
    """A shape as TensorFlow prints it in signatures: [-1, 28, 28, 1], or <unknown> (unknown rank)."""
    if shape is None:
        return "<unknown>"
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape) + "]"


def describe_files(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under the directory except the manifest itself."""
    return {
        str(path.relative_to(directory)): FileEntry(sha256=sha256_of(path), size=path.stat().st_size)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate manifest.json, with a clear error for anything unreadable."""
    path = directory / MANIFEST_FILE
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ServableError(f"{directory} is not a servable: {MANIFEST_FILE} is missing") from None
    except (OSError, orjson.JSONDecodeError) as e:
        raise ServableError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ServableError(f"{path} must hold a JSON object")
    found = raw.get("format_version")
    if found not in READABLE_FORMATS:
        raise ServableError(
            f"{path} has format_version {found!r}; this Kiln reads format_version "
            f"{', '.join(map(str, READABLE_FORMATS))}: recompile it with this Kiln (kiln compile)"
        )
    try:
        return Manifest.parse(raw)
    except ValueError as e:
        raise ServableError(f"{path} is not a valid manifest: {problem(e)}") from None


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every listed file is present with its recorded size and sha256 (sizes first: they are cheap).

    Files are hashed on all cores at once (hashlib releases the GIL): this is most of a large
    servable's cold start.
    """
    for relative, entry in manifest.files.items():
        path = directory / relative
        if not path.is_file():
            raise ServableError(f"servable {directory}: file {relative} is missing")
        check_file(directory, relative, entry, size=path.stat().st_size)
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(manifest.files, key=lambda name: -manifest.files[name].size)
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        digests = dict(zip(names, pool.map(lambda name: sha256_of(directory / name), names)))
    for relative, entry in manifest.files.items():
        check_file(directory, relative, entry, sha256=digests[relative])


def check_file(
    directory: Path | str, relative: str, entry: FileEntry, *, size: int | None = None, sha256: str | None = None
) -> None:
    """Refuse a file whose size or sha256 (where given) is not the manifest's."""
    if size is not None and size != entry.size:
        raise ServableError(f"servable {directory}: file {relative} has {size} bytes, the manifest says {entry.size}")
    if sha256 is not None and sha256 != entry.sha256:
        raise ServableError(
            f"servable {directory}: file {relative} has sha256 {sha256}, the manifest says {entry.sha256}"
        )
