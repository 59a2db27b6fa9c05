"""Archive scoring on Ray Data: ``python -m pneunet predict`` for more films than one machine can score.

    python -m pneunet predict --ray local /archive/ --out results.parquet            # Ray on this machine only
    python -m pneunet predict --ray auto films.txt --out results.csv --threads 2     # the cluster this node joined
    python -m pneunet predict --ray HEAD:6379 s3://bucket/films/ --out results.parquet --actors 32 --batch-size 32

The driver lists the files (a folder as ``python -m pneunet predict`` expands it; a ``.txt`` SOURCE holds
one path or URI per line, relative paths taken from the list's folder; a folder URI is listed through
pyarrow's filesystems), then Ray Data carries the list through ``map_batches`` to a pool of actors
(``ScoreImages``). Each actor loads the torch-free ``Predictor`` once and runs what the single-machine
command runs: ``Predictor.prepare`` (decode, image-level input gate, lung fields, the one preprocessing
path) and ``Predictor.predict_prepared``, made into rows by ``pneunet.cli.result_row`` / ``error_row``. The
rows therefore equal ``python -m pneunet predict --csv`` cell for cell, refused and unreadable files
included with their reasons, and they come back in input order (Ray Data's ``preserve_order``): the
driver streams them into one Parquet file (every column a string, exactly the CSV's cells) or one CSV,
written beside the target and renamed into place when complete.

Every node needs this checkout at the same path with training/requirements-cluster.txt installed (the
workers import ``pneunet`` through the driver's ``sys.path``). The driver loads the model once to check it,
and pins that file by path and sha256, so an actor on a node with another checkout refuses to score.
``--threads`` is per actor (default 1) and is the CPU count each actor asks Ray for. A cluster started with
token authentication (Ray's default for a new one) wants the driver to have ``RAY_AUTH_MODE=token`` and the
cluster's token (``RAY_AUTH_TOKEN``, or ``~/.ray/auth_token``). ``--ray local`` listens on 127.0.0.1 only.
Ray is imported only here, and only when ``--ray`` is given; usage statistics stay off.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

LIST_SUFFIX = ".txt"
OUT_SUFFIXES = (".parquet", ".csv")
PARQUET_ROW_GROUP = 10_000  # rows per Parquet row group: the driver holds at most this many


@dataclass(frozen=True)
class ModelOptions:
    """What every actor passes to ``Predictor.load``: the model file the driver loaded, and its sha256."""

    model: str
    sha256: str
    backend: str = "auto"
    gate: bool = True
    threads: int = 1
    int8_kernels: str = "auto"
    site: str | None = None


@dataclass(frozen=True)
class ClusterOptions:
    address: str = "local"  # local, auto, HOST:PORT or ray://HOST:PORT (ray.init's address)
    actors: int | None = None  # None: the cluster's CPUs // threads per actor
    batch_size: int = 16  # images per map_batches call, as the single-machine loop batches them


def is_uri(source: str) -> bool:
    return re.match(r"[A-Za-z][\w+.-]*://", source) is not None


def list_sources(sources: Iterable[str], lists: bool = True) -> list[tuple[str, str]]:
    """One (path as the results show it, where an actor reads it) per file, in input order. Local files
    are shown as ``python -m pneunet predict`` shows them and read by absolute path; URIs as given."""
    from pneunet.cli import expand_paths

    files = []
    for source in sources:
        if is_uri(source):
            files += [(uri, uri) for uri in list_uri(source)]
        elif lists and source.lower().endswith(LIST_SUFFIX):
            files += list_sources(list_entries(Path(source)), lists=False)
        else:
            files += [(str(path), str(path.absolute())) for path in expand_paths([source])[0]]
    return files


def list_entries(list_file: Path) -> list[str]:
    """The paths or URIs in a list file, one a line (blank lines and ``#`` comments skipped); relative
    paths are taken from the list's folder."""
    try:
        lines = list_file.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"{list_file}: the list of files could not be read ({error.strerror or error})") from error
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [entry if is_uri(entry) or Path(entry).is_absolute() else str(list_file.parent / entry) for entry in entries]


def split_uri(uri: str):
    """(pyarrow filesystem, path on it, the URI's prefix before that path: ``s3://``, ``file://``, ...)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    base = uri.rstrip("/")
    prefix = base[: len(base) - len(path)] if path and base.endswith(path) else uri.split("://", 1)[0] + "://"
    return filesystem, path, prefix


def list_uri(uri: str) -> list[str]:
    """A file URI as it is; a folder URI (s3://, gs://, file://, ...) as the images under it, sorted."""
    from pyarrow import fs

    from pneunet.cli import IMAGE_SUFFIXES

    try:
        filesystem, path, prefix = split_uri(uri)
        if filesystem.get_file_info(path).type != fs.FileType.Directory:
            return [uri]  # a file, or a missing one: its row says which
        found = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{uri}: could not be listed ({error})") from error
    return sorted(prefix + info.path for info in found
                  if info.type == fs.FileType.File and Path(info.path).suffix.lower() in IMAGE_SUFFIXES)


class ScoreImages:
    """The ``map_batches`` callable: one Predictor per actor, loaded once; a batch of (index, path, location)
    in, the same rows as ``python -m pneunet predict --csv`` out (plus the index)."""

    def __init__(self, options: ModelOptions):
        from pneunet.integrity import ModelFileError
        from pneunet.predictor import Predictor

        self.predictor = Predictor.load(options.model, options.backend, gate=options.gate, threads=options.threads,
                                        int8_kernels=options.int8_kernels, site=options.site)
        if self.predictor.backend.sha256 != options.sha256:
            raise ModelFileError(f"{options.model} on {os.uname().nodename} is not the model the driver loaded (sha256 "
                                 f"{self.predictor.backend.sha256[:12]}... vs {options.sha256[:12]}...); give every node "
                                 "the same checkout")
        self.filesystems: dict[str, tuple] = {}  # URI prefix -> (filesystem, prefix): one S3 client, not one per file

    def read(self, location: str):
        """What ``Predictor.prepare`` gets: a local path (it reads and size-checks the file itself, as on one
        machine), or a URI's bytes (at most one byte past prepare's size limit, which then refuses them)."""
        if not is_uri(location):
            return Path(location)
        from pneunet.preprocessing import MAX_FILE_BYTES, InvalidImageError

        try:
            root = re.match(r"[^:]+://[^/]*", location).group()
            if root not in self.filesystems:
                filesystem, _, prefix = split_uri(location)
                self.filesystems[root] = filesystem, prefix
            filesystem, prefix = self.filesystems[root]
            path = location[len(prefix):] if location.startswith(prefix) else split_uri(location)[1]
            with filesystem.open_input_stream(path) as stream:
                return stream.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError as error:
            raise InvalidImageError("no such file") from error
        except (OSError, ValueError) as error:
            raise InvalidImageError(f"file could not be read ({error})") from error

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from pneunet.cli import CSV_FIELDS, error_row, result_row
        from pneunet.preprocessing import InvalidImageError

        rows: dict[int, dict] = {}
        prepared = []
        for position, (path, location) in enumerate(zip(batch["path"], batch["location"])):
            try:
                prepared.append((position, path, self.predictor.prepare(self.read(location))))
            except InvalidImageError as error:  # unreadable, or refused as not a chest X-ray
                rows[position] = error_row(path, str(error))
        if prepared:
            results = self.predictor.predict_prepared([image for _, _, image in prepared])
            for (position, path, _), result in zip(prepared, results):
                rows[position] = result_row(path, result)  # a feature-level refusal becomes an error row
        ordered = [rows[position] for position in range(len(rows))]
        return {"index": np.asarray(batch["index"]),
                **{name: np.array([row[name] for row in ordered], dtype=object) for name in CSV_FIELDS}}


def connect(address: str) -> bool:
    """Join (or, for ``local``, start) a Ray cluster; True when this call started the connection."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage telemetry
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    if address == "local" or host in ("127.0.0.1", "localhost"):
        # Ray takes the node's address from the route to the outside and binds its servers there; with
        # this setting (Ray's own for single-machine macOS/Windows) it uses and binds 127.0.0.1 only.
        # It must be set before ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():  # a caller that already holds a cluster (a notebook, a test)
        return False
    if address == "local":
        ray.init(address="local", include_dashboard=False, logging_level="warning")
    else:
        ray.init(address=address, logging_level="warning")
    return True


def default_actors(threads: int) -> int:
    """One actor per ``threads`` of the connected cluster's CPUs."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // threads))


def score(files: list[tuple[str, str]], model: ModelOptions, cluster: ClusterOptions, progress: bool = True) -> Iterator[dict]:
    """Rows of ``pneunet.cli.CSV_FIELDS`` for ``files`` (from ``list_sources``), in input order, scored by
    ``ScoreImages`` actors on the connected cluster."""
    import ray

    from pneunet.cli import CSV_FIELDS

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order, streamed to the writer
    context.enable_progress_bars = progress
    actors = cluster.actors or default_actors(model.threads)
    items = [{"index": index, "path": path, "location": location} for index, (path, location) in enumerate(files)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // cluster.batch_size)))
    scored = dataset.map_batches(ScoreImages, fn_constructor_kwargs={"options": model}, batch_size=cluster.batch_size,
                                 compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=model.threads,
                                 batch_format="numpy", udf_modifying_row_count=False)
    expected = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for position, index in enumerate(batch["index"]):
            if int(index) != expected:
                raise RuntimeError(f"Ray Data returned file {int(index)} where file {expected} was due; results must "
                                   "come in input order (DataContext.execution_options.preserve_order)")
            expected += 1
            yield {name: str(batch[name][position]) for name in CSV_FIELDS}
    if expected != len(files):
        raise RuntimeError(f"Ray Data returned {expected} rows for {len(files)} files")


def write_rows(rows: Iterable[dict], out: Path, on_error: Callable[[dict], None] | None = None) -> tuple[int, int]:
    """Stream rows into ``out`` (.parquet: every column a string, the CSV's cells; .csv: as ``--csv`` writes
    it) through a ``.part`` file renamed into place at the end; ``on_error(row)`` for each failed file.
    Returns (rows, failed)."""
    from pneunet.cli import CSV_FIELDS

    partial = out.with_name(out.name + ".part")
    written = failed = 0
    try:
        if out.suffix.lower() == ".csv":
            with open(partial, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
                writer.writeheader()
                for row in rows:
                    writer.writerow(row)
                    written, failed = written + 1, failed + bool(row["error"])
                    if row["error"] and on_error:
                        on_error(row)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([(name, pa.string()) for name in CSV_FIELDS])
            with pq.ParquetWriter(partial, schema) as writer:
                group: list[dict] = []
                for row in rows:
                    group.append(row)
                    written, failed = written + 1, failed + bool(row["error"])
                    if row["error"] and on_error:
                        on_error(row)
                    if len(group) == PARQUET_ROW_GROUP:
                        writer.write_table(pa.Table.from_pylist(group, schema=schema))
                        group = []
                if group or not written:
                    writer.write_table(pa.Table.from_pylist(group, schema=schema))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return written, failed


def check_arguments(args: argparse.Namespace) -> str | None:
    """Why these ``predict --ray`` arguments cannot run, or None."""
    out = args.out or args.csv
    if args.out and args.csv:
        return "give the results file once: --out with --ray (--csv is taken as --out there)"
    if not out:
        return "--ray needs --out results.parquet (or results.csv)"
    if Path(out).suffix.lower() not in OUT_SUFFIXES:
        return f"--out {out}: write .parquet or .csv"
    if args.cam or args.heatmaps:
        return "--cam and --heatmaps are not written by --ray; run python -m pneunet predict on the files you want to see"
    for name in ("actors", "batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    return None


def run_cluster_predict(args: argparse.Namespace) -> int:
    """``python -m pneunet predict --ray``: exit 0, 1 when any file failed (as on one machine), 2 on bad use."""
    from pneunet.cli import BATCH_SIZE, load_for_cli

    problem = check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        files = list_sources(args.paths)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not files:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    threads = args.threads or 1  # per actor: several actors share a node's cores
    args = argparse.Namespace(**{**vars(args), "threads": threads})
    predictor = load_for_cli(args)  # checks the files and says what it says on one machine
    if predictor is None:
        return 2
    model = ModelOptions(str(Path(predictor.backend.path).absolute()), predictor.backend.sha256, args.backend,
                         not args.no_gate, threads, args.int8_kernels, str(Path(args.site).absolute()) if args.site else None)
    del predictor
    try:
        started = connect(args.ray)
    except ConnectionError as error:  # nothing listening there, or a token it does not accept
        print(f"error: {error}; start one with `ray start --head`, or use --ray local (see pneunet/cluster.py)", file=sys.stderr)
        return 2
    import ray

    try:
        cluster = ClusterOptions(args.ray, args.actors or default_actors(threads), args.batch_size or BATCH_SIZE)
        print(f"scoring {len(files)} files on Ray {ray.__version__} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs): "
              f"{cluster.actors} actor(s) of {threads} thread(s), batches of {cluster.batch_size}", file=sys.stderr)
        written, failed = write_rows(score(files, model, cluster, progress=not args.quiet), Path(args.out or args.csv),
                                     on_error=lambda row: print(f"{row['path']}: {row['error']}", file=sys.stderr))
    finally:
        if started:
            ray.shutdown()
    print(f"wrote {written} rows to {args.out or args.csv} ({failed} failed)", file=sys.stderr)
    return 1 if failed else 0

