"""Where the inputs of batch scoring are: the objects a file, directory or prefix names (.jsonl,
.ndjson, .csv, optionally .gz), each located in its store, and which objects are results
(under *.predictions/ or the output prefix), never scored again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runtime.errors import InvalidInput
from runtime.storage import KeyNotFound, Storage, key_parts, open_storage

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
RESULTS_SUFFIX = ".predictions"


def expand_inputs(inputs: list[str]) -> list[str]:
    """Every object the inputs name: a file or object as it is; a directory or prefix (s3://B/P,
    gs://B/P, a local directory) as its .jsonl, .ndjson and .csv objects (optionally .gz) at any
    depth, sorted, leaving out results (*.predictions/). Local paths come back absolute; duplicates
    once, in first-seen order."""
    found: dict[str, None] = {}
    for item in inputs:
        for url in expand(item):
            found.setdefault(url, None)
    return list(found)


def expand(item: str) -> list[str]:
    if is_object_url(item):
        root, key = split_object_url(item)
        storage = open_storage(root)
        if key and not item.endswith("/"):
            try:
                storage.stat(key)
                return [item]
            except KeyNotFound:
                pass
        keys = [k for k in storage.list_keys(key) if scorable(k)]
        if not keys:
            raise InvalidInput(f"no .jsonl, .ndjson or .csv objects (optionally .gz) under {item}")
        return [f"{root}/{k}" for k in keys]
    path = local_path(item)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        keys = [k for k in open_storage(str(path)).list_keys() if scorable(k)]
        if not keys:
            raise InvalidInput(f"no .jsonl, .ndjson or .csv files (optionally .gz) in {item}")
        return [str(path / k) for k in keys]
    raise InvalidInput(f"{item}: no such file or directory")


def scorable(key: str) -> bool:
    return format_of(key) is not None and not is_result_key(key)


def format_of(key: str) -> tuple[str, bool] | None:
    """(jsonl | csv, gzipped) by the name's extension; None for any other name."""
    name = key.rpartition("/")[2].lower()
    compressed = name.endswith(".gz")
    suffix = PurePosixPath(name[:-3] if compressed else name).suffix
    return (FORMATS[suffix], compressed) if suffix in FORMATS else None


def is_result_key(key: str) -> bool:
    return any(part.endswith(RESULTS_SUFFIX) for part in key.split("/")[:-1])


def is_object_url(url: str) -> bool:
    return url.startswith(("s3://", "gs://"))


def split_object_url(url: str) -> tuple[str, str]:
    """("s3://BUCKET", KEY): split by hand, since keys may hold '?' and '#'."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InvalidInput(f"{url}: no bucket named")
    return f"{scheme}://{bucket}", key.strip("/")


def local_path(url: str) -> Path:
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        url = unquote(urlparse(url).path)
    return Path(url).absolute()


@dataclass(frozen=True)
class Source:
    url: str  # as given
    canonical: str  # s3://B/K, gs://B/K or file:///PATH: compared with the output prefix
    storage: Storage
    key: str
    name: str  # where its results go under the output prefix, by default


def locate(url: str) -> Source:
    try:
        if is_object_url(url):
            root, key = split_object_url(url)
            key = "/".join(key_parts(key))
            if not key:
                raise InvalidInput(f"{url} names a bucket, not an object")
            return Source(url, f"{root}/{key}", open_storage(root), key, f"{root.partition('://')[2]}/{key}")
        path = local_path(url)
        return Source(url, path.as_uri(), open_storage(str(path.parent)), path.name, str(path).lstrip("/"))
    except ValueError as e:
        raise InvalidInput(f"{url}: {e}") from None


def is_result(source: Source, output: Storage) -> bool:
    inside_output = source.canonical.startswith(output.url.rstrip("/") + "/")
    return inside_output or is_result_key(source.canonical.partition("://")[2])


def plan_inputs(items: list[str], output_prefix: str) -> tuple[list[str], dict[str, str]]:
    """`kiln score`'s inputs: every object the items name (expand_inputs) but results, and where
    the results of local ones go: their paths relative to the directory named (or, for a file
    named, its name), so that `kiln score data/ --out results/` writes results/a.jsonl.predictions/.
    Objects in stores keep the default (BUCKET/KEY), the same as the Lambda and Cloud Run handlers."""
    output = open_storage(output_prefix)
    sources: dict[str, None] = {}
    names: dict[str, str] = {}
    for item in items:
        base = None if is_object_url(item) else local_path(item)
        for source in expand(item):
            if source in sources or is_result(locate(source), output):
                continue
            sources[source] = None
            if base is not None:
                path = local_path(source)
                names[source] = path.relative_to(base).as_posix() if base.is_dir() else path.name
    taken: dict[str, str] = {}
    for source, name in names.items():
        if name in taken:
            raise InvalidInput(
                f"{taken[name]} and {source} would both write their results to "
                f"{output.url}/{name}{RESULTS_SUFFIX}/; score them into different outputs"
            )
        taken[name] = source
    return list(sources), names


def input_size(source: str) -> int:
    """The object's size in bytes, for progress."""
    located = locate(source)
    return located.storage.stat(located.key).size
