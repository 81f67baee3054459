"""`kiln compile`: SavedModel in, servable out.

Every selected signature is compiled ahead of time for every bucket, or, when XLA AOT cannot take
it, packaged for the saved-model engine with its XLA compilations prebuilt (never dropped: with
--engine xla-aot such a signature is an error naming it and the reason). Stateful signatures are
declared here (--state, --state-capacity), checked against the signatures before anything compiles,
and recorded in the manifest. The servable is built in a staging directory and moved into place
whole, manifest last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

from runtime.compiler.aot import tfcompile
from runtime.compiler.cross import toolchain_for
from runtime.compiler.partition import Partition, partition_signatures, remainder, write_tables
from runtime.compiler.savedmodel import SignatureInfo, bucket_key, export_static, read_signatures
from runtime.compiler.state_declarations import declare_state
from runtime.compiler.target import resolve_target
from runtime.compiler.weights import CONSTANTS, link_weights
from runtime.cpu import architecture_of, host_architecture
from runtime.engines.saved_model import SAVED_MODEL_DIR
from runtime.errors import CompileError
from runtime.manifest import (
    EMBEDDED_RUNTIME_FORMAT,
    FORMAT_VERSION,
    Build,
    Engine,
    Manifest,
    ServableEngine,
    SharedRuntime,
    Signature,
    Target,
    describe_files,
    sha256_of,
)
from runtime.progress import steps
from runtime.warmup import WARMUP_DIR, WARMUP_FILES

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
EngineChoice = Literal["auto", "xla-aot", "saved-model"]


def compile_servable(
    saved_model: Path,
    out: Path,
    *,
    name: str | None = None,
    version: int | None = None,
    signatures: list[str] | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    target_cpu: str | Sequence[str] = "native",
    engine: EngineChoice = "auto",
    tags: str = "serve",
    multithreading: bool = True,
    state: Mapping[str, Mapping[str, str]] | None = None,
    positions: Mapping[str, tuple[str, int | str]] | None = None,
    appended: Mapping[str, Sequence[str]] | None = None,
    embed_runtime: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Compile the SavedModel's signatures into a servable at `out`; see the module's documentation.

    `state` declares stateful signatures, {signature: {state input: the output fed back into it}},
    and `positions` {signature: (position input, capacity)} the state input that counts the tokens
    a session holds, and `appended` {signature: [state input]} the state inputs whose output is only
    the entries to write at the position (runtime/manifest.py has the rules); all are checked before
    anything compiles.

    The runtime library goes into the servable only with `embed_runtime`; else it is installed on this
    machine and, when `out` is BASE/NAME/VERSION, written once beside the servables in BASE/.kiln/runtime/
    (runtime/runtime_library.py).
    Several `target_cpu`s, one per architecture, build one servable for each: the first in lib/, each
    other in lib/TRIPLE/. A build for another architecture than this machine's always carries its
    runtime (what is installed here is this machine's) (runtime/manifest.py's Build).
    """
    saved_model, out = Path(saved_model), Path(out)
    name, version = _name_and_version(out, name, version)
    batch_sizes = tuple(sorted(set(batch_sizes)))
    if not batch_sizes or batch_sizes[0] < 1:
        raise CompileError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    targets = _resolve_targets([target_cpu] if isinstance(target_cpu, str) else list(target_cpu))
    target = targets[0]
    infos = declare_state(
        _select(read_signatures(saved_model, tags), signatures, saved_model),
        state or {},
        positions or {},
        appended or {},
    )
    fronts: dict[str, Partition] = {}
    embed_runtime = embed_runtime or architecture_of(target.triple) != host_architecture()
    if engine == "saved-model":
        reasons = {key: "built with --engine saved-model" for key in infos}
    else:
        infos, reasons = _elementwise(saved_model, tags, infos, log)
        infos, reasons, fronts = _host_fronts(saved_model, tags, infos, reasons, log)
    _refuse_if_forced(engine, reasons)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-compile-") as work:
            setup = _Setup(saved_model, tags, batch_sizes, multithreading, fronts, Path(work), staging, log)
            aot = {key: info for key, info in infos.items() if not reasons[key]}
            libraries, runtime, weights = _compile_aot(setup, aot, target, reasons, embed_runtime=embed_runtime)
            _refuse_if_forced(engine, reasons)
            builds = _further_builds(setup, {key: info for key, info in aot.items() if not reasons[key]}, targets[1:])
        # The saved-model engine runs a signature as declared: not over flat runs of elements, no host front.
        infos = {
            key: replace(info, elementwise=False, host=None) if reasons[key] else info for key, info in infos.items()
        }
        write_tables({key: front for key, front in fronts.items() if not reasons[key]}, staging)
        fallback = [key for key in infos if reasons[key]]
        manifest = Manifest(
            name=name,
            version=version,
            engine=_engine_of(infos, reasons),
            signatures={
                key: Signature(
                    method=info.method,
                    inputs=info.inputs,
                    outputs=info.outputs,
                    batched=info.batched,
                    engine="saved-model" if reasons[key] else "xla-aot",
                    libraries=libraries.get(key, {}),
                    reason=reasons[key],
                    state=dict(info.state),
                    position=info.position,
                    appended=info.appended,
                    elementwise=info.elementwise,
                    host=info.host,
                )
                for key, info in infos.items()
            },
            batch_sizes=batch_sizes,
            target=target,
            tensorflow_version=tf.__version__,
            runtime=runtime,
            weights=weights,
            files={},
            builds=builds,  # the oldest format that describes it, for older readers
            format_version=1 if not runtime else EMBEDDED_RUNTIME_FORMAT if runtime.embedded else FORMAT_VERSION,
        )
        if fallback:
            log(f"packaging {', '.join(fallback)} for the saved-model engine")
            shutil.copytree(saved_model, staging / SAVED_MODEL_DIR)
            if {architecture_of(t.triple) for t in targets} == {host_architecture()}:
                manifest = _prebuild_xla_cache(staging, manifest)
            else:  # XLA's cache holds this machine's code: those signatures run as TensorFlow graphs
                log(f"no XLA cache prebuilt for {', '.join(fallback)}: it would hold {host_architecture()} code only")
        _copy_warmup_requests(saved_model, staging, log)
        manifest = manifest.replace(files=describe_files(staging))
        manifest.write(staging)
        if runtime and not runtime.embedded and out.name.isdigit():
            _publish_runtime(runtime, out.parent.parent, log)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _resolve_targets(cpus: list[str]) -> list[Target]:
    """The targets of --target-cpu's names: at least one, at most one per architecture."""
    if not cpus:
        raise CompileError("--target-cpu needs at least one CPU")
    targets = [resolve_target(cpu) for cpu in cpus]
    triples = [target.triple for target in targets]
    if len(set(triples)) < len(triples):
        raise CompileError(
            f"--target-cpu {','.join(cpus)} names two CPUs of one architecture ({', '.join(triples)}); "
            f"a servable holds one build per architecture"
        )
    return targets


@dataclass(frozen=True)
class _Setup:
    """What compiling for each target shares."""

    saved_model: Path
    tags: str
    batch_sizes: tuple[int, ...]
    multithreading: bool
    fronts: Mapping[str, Partition]  # signature -> its string front on the host (runtime/compiler/partition.py)
    work: Path  # scratch, one directory per target triple under it
    staging: Path  # the servable being built
    log: Callable[[str], None]


class _Bucket(NamedTuple):
    """One (signature, bucket) compiled by tfcompile, and the library in the servable it is linked into."""

    key: str
    batch: int
    header: Path
    cpp_class: str
    objects: list[Path]
    library: str


def _further_builds(setup: _Setup, infos: dict[str, SignatureInfo], targets: list[Target]) -> tuple[Build, ...]:
    """The code for each target after the first, in lib/TRIPLE/ with its own runtime (a machine of that
    architecture finds it in the servable; the installed runtime is this machine's). Every signature
    compiled for the first target must compile for the others: a servable serves the same signatures
    on every machine."""
    builds: list[Build] = []
    for target in targets:
        setup.log(f"compiling for {target.triple} (cpu {target.cpu})")
        reasons = {key: "" for key in infos}
        libraries, runtime, weights = _compile_aot(
            setup, infos, target, reasons, embed_runtime=True, lib=f"lib/{target.triple}"
        )
        failed = [f"{key}: {reason}" for key, reason in reasons.items() if reason]
        if failed:
            raise CompileError(
                f"compiled for {', '.join(b.target.triple for b in builds) or 'the first target'} "
                f"but not for {target.triple}: {'; '.join(failed)}"
            )
        builds.append(Build(target=target, runtime=runtime, weights=weights, libraries=libraries))
    return tuple(builds)


def _copy_warmup_requests(saved_model: Path, staging: Path, log) -> None:
    """The SavedModel's warm-up requests (TF Serving's TFRecord, Kiln's JSON) go with the servable."""
    for name in WARMUP_FILES:
        source = saved_model / WARMUP_DIR / name
        if source.is_file():
            (staging / WARMUP_DIR).mkdir(exist_ok=True)
            shutil.copy(source, staging / WARMUP_DIR / name)
            log(f"warm-up requests: {WARMUP_DIR}/{name}")


def _elementwise(
    saved_model: Path, tags: str, infos: dict[str, SignatureInfo], log
) -> tuple[dict[str, SignatureInfo], dict[str, str]]:
    """The signatures, those kept from XLA AOT only by their inputs' unknown rank or dynamic inner
    dimensions marked elementwise where their graph is (runtime/compiler/elementwise.py), and why
    XLA AOT cannot take each of the others ("" where it can)."""
    from runtime.compiler.elementwise import elementwise_obstacles

    candidates = [
        key
        for key, info in infos.items()
        if info.shape_obstacle() and not info.dtype_obstacle() and not info.state and info.flat_inputs()
    ]
    obstacles = elementwise_obstacles(saved_model, tags, candidates)
    infos, reasons = dict(infos), {}
    for key, info in infos.items():
        reason = info.aot_obstacle()
        if key in obstacles:
            why = obstacles[key]
            if not why:
                log(f"{key}: elementwise over inputs of any shape; compiling it over runs of elements")
                infos[key], reason = replace(info, elementwise=True), ""
            else:
                reason = f"{reason}, and it is not elementwise over its inputs ({why})"
        reasons[key] = reason
    return infos, reasons


def _host_fronts(
    saved_model: Path, tags: str, infos: dict[str, SignatureInfo], reasons: dict[str, str], log
) -> tuple[dict[str, SignatureInfo], dict[str, str], dict[str, Partition]]:
    """Signatures kept from XLA AOT by string inputs, split where their string front can run on the
    host (runtime/compiler/partition.py): their host programs, and their partitions by key."""
    candidates = [key for key, info in infos.items() if reasons[key] and info.dtype_obstacle() and not info.state]
    infos, reasons, fronts = dict(infos), dict(reasons), {}
    for key, found in partition_signatures(saved_model, tags, candidates).items():
        if isinstance(found, str):
            reasons[key] = f"{reasons[key]}, and its string front cannot run on the host: {found}"
            continue
        # The front reads a batch of strings: a string input of unknown rank is served as a vector.
        inputs = tuple(
            spec.replace(shape=(None,)) if spec.shape is None and spec.dtype == "string" else spec
            for spec in infos[key].inputs
        )
        outputs = tuple(
            spec.replace(shape=found.output_shapes.get(spec.name)) if spec.shape is None else spec
            for spec in infos[key].outputs
        )
        split = replace(infos[key], host=found.program, inputs=inputs, outputs=outputs)
        if split.aot_obstacle():
            reasons[key] = f"{reasons[key]}; its numeric remainder cannot be compiled: {split.aot_obstacle()}"
            continue
        steps = ", ".join(step.op for step in found.program.steps)
        log(f"{key}: string front on the host ({steps}); compiling the numeric remainder")
        infos[key], reasons[key], fronts[key] = split, "", found
    return infos, reasons, fronts


def _name_and_version(out: Path, name: str | None, version: int | None) -> tuple[str, int]:
    """Defaults from a repository layout BASE/NAME/VERSION, else the directory's own name, version 1."""
    numbered = out.name.isdigit()
    return (
        name or (out.parent.name if numbered else out.name),
        version if version is not None else (int(out.name) if numbered else 1),
    )


def _select(infos: dict[str, SignatureInfo], wanted: list[str] | None, saved_model: Path):
    if not infos:
        raise CompileError(f"the SavedModel at {saved_model} has no signatures to serve")
    if not wanted:
        return infos
    unknown = [key for key in wanted if key not in infos]
    if unknown:
        raise CompileError(f"signature(s) {', '.join(unknown)} not in the SavedModel; it has {', '.join(infos)}")
    return {key: infos[key] for key in wanted}


def _refuse_if_forced(engine: EngineChoice, reasons: dict[str, str]) -> None:
    if engine == "xla-aot":
        for key, reason in reasons.items():
            if reason:
                raise CompileError(f"signature '{key}' cannot be compiled ahead of time: {reason}")


def _engine_of(infos, reasons) -> ServableEngine:
    engines: set[Engine] = {"saved-model" if reasons[key] else "xla-aot" for key in infos}
    return engines.pop() if len(engines) == 1 else "mixed"


def _compile_aot(
    setup: _Setup,
    infos: dict[str, SignatureInfo],
    target: Target,
    reasons: dict[str, str],
    *,
    embed_runtime: bool = False,
    lib: str = "lib",
) -> tuple[dict[str, dict[int, str]], SharedRuntime | None, str | None]:
    """tfcompile every (signature, bucket), then link the libraries in parallel into `lib`.

    Signatures that are one function (same_functions) compile once and name the same libraries.
    A signature that tfcompile refuses (an unsupported op, a lookup table) gets that as its reason.
    """
    if not infos:
        return {}, None, None
    from tensorflow.python.tools import saved_model_utils

    log, staging, work = setup.log, setup.staging, setup.work / target.triple
    aliases = same_functions(infos)
    for alias, key in aliases.items():
        log(f"{alias} is the same function as {key}: compiled once")
    plan = {key: list(setup.batch_sizes) if info.batched else [0] for key, info in infos.items() if key not in aliases}
    static = work / "static"
    log(f"exporting static shapes for {len(plan)} signature(s)")
    export_static(
        setup.saved_model,
        setup.tags,
        infos,
        plan,
        static,
        {key: partial(remainder, partition=front) for key, front in setup.fronts.items()},
    )
    meta_graph = saved_model_utils.get_meta_graph_def(str(static), "serve")
    toolchain = toolchain_for(target)
    jobs: list[_Bucket] = []
    with steps(sum(map(len, plan.values())), "compiling", "bucket") as bar:
        for index, (key, batches) in enumerate(plan.items()):
            compiled = []
            for batch in batches:
                cpp_class = f"kiln_s{index}_b{batch}"
                log(f"compiling {key} for batch {batch or 'static'}")
                bar.set_postfix_str(f"{key} batch {batch or 'static'}")
                try:
                    header, objects = tfcompile(
                        static,
                        meta_graph,
                        bucket_key(key, batch),
                        work / cpp_class,
                        cpp_class,
                        target,
                        setup.multithreading,
                    )
                except CompileError as e:
                    reasons[key] = f"XLA could not compile it: {e}"
                    break
                finally:
                    bar.update()
                library = f"{lib}/{index:02d}_{re.sub(r'[^0-9A-Za-z_]', '_', key)}_b{batch}.so"
                compiled.append(_Bucket(key, batch, header, cpp_class, objects, library))
            else:
                jobs.extend(compiled)
    (staging / lib).mkdir(parents=True, exist_ok=True)
    libraries: dict[str, dict[int, str]] = {}
    runtime = None
    if jobs:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            shims = list(pool.map(lambda job: toolchain.compile_shim(job.header, job.cpp_class, work / "shims"), jobs))
            kernels = toolchain.kernels_called_by([*shims, *(o for job in jobs for o in job.objects)])
            log(f"linking the shared runtime ({', '.join(kernels) or 'no kernels'})")
            runtime = toolchain.link_runtime(kernels)
            weights = link_weights(
                [o for job in jobs for o in job.objects if o.name.endswith(CONSTANTS)],
                staging / lib,
                work / "weights",
                toolchain.cxx,
            )
            log(f"weights: {weights.stat().st_size / 1e6:.1f} MB, each distinct constant once ({weights.name})")
            log(f"linking {len(jobs)} librar{'y' if len(jobs) == 1 else 'ies'}")
            with steps(len(jobs), "linking", "library") as bar:
                for _ in pool.map(
                    lambda job, shim: toolchain.link_bucket(
                        shim,
                        [o for o in job.objects if not o.name.endswith(CONSTANTS)],
                        [runtime, weights],
                        staging / job.library,
                    ),
                    jobs,
                    shims,
                ):
                    bar.update()
    for job in jobs:
        libraries.setdefault(job.key, {})[job.batch] = job.library
    for alias, key in aliases.items():
        if reasons[key]:
            reasons[alias] = reasons[key]
        else:
            libraries[alias] = libraries[key]
    if runtime is None:
        return libraries, None, None
    shared = _shared_runtime(
        runtime,
        toolchain.runtime_key(kernels),
        staging,
        lib,
        embed_runtime,
        _bytes_saved(jobs, aliases, runtime, weights, staging, embed_runtime),
    )
    return libraries, shared, str(weights.relative_to(staging))


def _shared_runtime(library: Path, key: str, staging: Path, lib: str, embed: bool, saved: int) -> SharedRuntime:
    """The runtime library copied into the servable's `lib` (embed), or installed on this machine and
    named by its key and checksum (runtime/runtime_library.py)."""
    from runtime import runtime_library

    file = f"{lib}/{library.name}"
    if embed:
        shutil.copy(library, staging / file)
        return SharedRuntime(key=key, file=file, bytes_saved=saved)
    runtime = SharedRuntime(
        key=key, file=file, embedded=False, size=library.stat().st_size, sha256=sha256_of(library), bytes_saved=saved
    )
    runtime_library.place(library, runtime_library.install_copy(runtime))
    return runtime


def _publish_runtime(runtime: SharedRuntime, base: Path, log) -> None:
    """The runtime once per store, beside its servables: BASE/.kiln/runtime/KEY/."""
    from runtime import runtime_library

    target = runtime_library.place(runtime_library.install_copy(runtime), runtime_library.store_copy(base, runtime))
    log(f"runtime {runtime.key}: shared by the servables of {base} ({target.relative_to(base)})")


def _bytes_saved(
    jobs: list[_Bucket], aliases: dict[str, str], runtime: Path, weights: Path, staging: Path, embedded: bool
) -> int:
    """How many bytes format 1 would have needed more: each bucket library with its own runtime and
    its own constants (tfcompile's objects, as big as their padded symbols), once per name."""
    names = {key: 1 + sum(1 for alias in aliases.values() if alias == key) for key in {job.key for job in jobs}}
    alone = sum(
        names[job.key]
        * (
            (staging / job.library).stat().st_size
            + runtime.stat().st_size
            + sum(o.stat().st_size for o in job.objects if o.name.endswith(CONSTANTS))
        )
        for job in jobs
    )
    shared = sum((staging / job.library).stat().st_size for job in jobs) + weights.stat().st_size
    return max(alone - shared - (runtime.stat().st_size if embedded else 0), 0)


def same_functions(infos: Mapping[str, SignatureInfo]) -> dict[str, str]:
    """{signature: the first signature (in key order) that is the same function} for every repeat."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key in sorted(infos):
        identity = infos[key].same_function()
        if identity is not None:
            aliases[key] = first.setdefault(identity, key)
    return {alias: key for alias, key in aliases.items() if alias != key}


def _prebuild_xla_cache(staging: Path, manifest: Manifest) -> Manifest:
    """Run every saved-model signature at every bucket in a fresh process that writes the persistent
    XLA cache (its flags must be set before TensorFlow starts); learn which ones XLA can compile."""
    manifest.write(staging)
    done = subprocess.run(
        [sys.executable, "-m", "runtime.compiler.xla_cache", str(staging)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    (staging / "manifest.json").unlink()
    if done.returncode != 0:
        raise CompileError(f"prebuilding the XLA cache failed:\n{done.stderr[-3000:]}")
    jit = json.loads(done.stdout.strip().splitlines()[-1])
    return manifest.replace(
        signatures={key: sig.replace(jit=jit.get(key, False)) for key, sig in manifest.signatures.items()}
    )


def _replace(staging: Path, out: Path) -> None:
    """Move the finished servable into place; an older one at the same path is removed after."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp made it private; servers may run as another user
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
