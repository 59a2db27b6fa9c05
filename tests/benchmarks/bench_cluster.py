"""Archive scoring benchmark: images per second of ``python -m pneunet predict`` in one process and with
``--ray local`` on 1 and 2 actors, on this machine, and the memory of one scoring actor.

    python -m tests.benchmarks.bench_cluster                       # writes docs/cluster_benchmark.md (~10 min on 2 cores)
    python -m tests.benchmarks.bench_cluster --images 96 --repeats 1 --out /tmp/quick.md   # a quick look

Each way is timed as a user meets it: the whole command in a fresh interpreter (model load, and for Ray
starting a local cluster and its actors), on N Kermany test films (half normal, half pneumonia) and on a
few, so that the report gives both the end-to-end rate (N / wall time) and the steady rate after start-up
((N - few) / (wall time N - wall time few)). Medians of ``--repeats`` runs; the machine may be shared, so
its load average is recorded beside the figures. Not collected by pytest (name does not start with test_).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FEW = 8  # images in the start-up run
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
WAYS = {  # name -> extra arguments of python -m pneunet predict
    "one process (CLI), runtime's threads": [],
    "one process (CLI), 1 thread": ["--threads", "1"],
    "Ray, 1 actor x 1 thread": ["--ray", "local", "--actors", "1", "--threads", "1"],
    "Ray, 2 actors x 1 thread": ["--ray", "local", "--actors", "2", "--threads", "1"],
    "Ray, 1 actor x 2 threads": ["--ray", "local", "--actors", "1", "--threads", "2"],
}


def film_folder(root: Path, count: int) -> Path:
    """``count`` Kermany test films, normal and pneumonia taken in turn, symlinked into a new folder; past the
    test set's 624 films they are linked again under new names (every film costs the same each time)."""
    from itertools import cycle, islice

    from pneunet.datasets import DEFAULT_DATA_DIR

    normal, pneumonia = (sorted((DEFAULT_DATA_DIR / "test" / label).glob("*.jpeg")) for label in ("NORMAL", "PNEUMONIA"))
    if not normal or not pneumonia:
        raise SystemExit(f"{DEFAULT_DATA_DIR / 'test'}: no NORMAL/ or PNEUMONIA/ films")
    films = list(islice((film for pair in zip(cycle(normal), cycle(pneumonia)) for film in pair), count))
    folder = root / f"films{count}"
    folder.mkdir()
    for number, film in enumerate(films):
        (folder / f"{number:06d}_{film.name}").symlink_to(film)
    return folder


def wall_seconds(folder: Path, extra: list[str], out: Path) -> float:
    """Wall time of one ``python -m pneunet predict FOLDER ...`` in a fresh interpreter."""
    target = ["--out", str(out.with_suffix(".parquet"))] if "--ray" in extra else ["--csv", str(out.with_suffix(".csv"))]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pneunet", "predict", str(folder), *target, "--quiet", *extra],
                          cwd=REPO, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1) or "wrote " not in done.stderr:  # 1: a film the input gate refused, still a row
        raise RuntimeError(f"{' '.join(extra) or 'CLI'} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


ACTOR_MEMORY = """
import json, os, sys
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, as --ray local
import ray
from pneunet.cli import expand_paths
from pneunet.cluster import ModelOptions, ScoreImages
from pneunet.predictor import Predictor

def status_kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

class Idle:
    def rss_mb(self):
        return status_kb("VmRSS") / 1024

class Measured(ScoreImages):
    def rss_mb(self):
        return status_kb("VmRSS") / 1024
    def peak_mb(self):
        return status_kb("VmHWM") / 1024

loaded = Predictor.load(threads=1)
options = ModelOptions(str(loaded.backend.path), loaded.backend.sha256, threads=1)
films = [str(p) for p in expand_paths([sys.argv[1]])[0]]
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
idle = ray.remote(num_cpus=1)(Idle).remote()
actor = ray.remote(num_cpus=1)(Measured).remote(options)
report = {"idle_worker_mb": ray.get(idle.rss_mb.remote()), "loaded_mb": ray.get(actor.rss_mb.remote())}
for size in (16, 64):
    batch = {"index": list(range(size)), "path": films[:size], "location": films[:size]}
    ray.get(actor.__call__.remote(batch))
    report[f"peak_after_batch_{size}_mb"] = ray.get(actor.peak_mb.remote())
ray.shutdown()
print(json.dumps(report))
"""


def actor_memory(folder: Path) -> dict:
    """RSS of an idle Ray worker, of a ScoreImages actor once its model is loaded, and its peak after a
    batch of 16 and then of 64 films (fresh interpreter, its own local cluster)."""
    import json

    done = subprocess.run([sys.executable, "-c", ACTOR_MEMORY, str(folder)], cwd=REPO, env={**os.environ, **RAY_ENV},
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"actor memory probe exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {memory_gb:.0f} GiB, {platform.system()} {platform.release()}"


def main(args: argparse.Namespace) -> None:
    import onnxruntime
    import ray

    from pneunet.predictor import Predictor

    loaded = Predictor.load()
    model = f"{Path(loaded.backend.path).relative_to(REPO) if Path(loaded.backend.path).is_relative_to(REPO) else loaded.backend.path}"
    del loaded
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        many, few = film_folder(root, args.images), film_folder(root, FEW)
        for name, extra in WAYS.items():
            runs_many, runs_few = [], []
            for repeat in range(args.repeats):
                runs_few.append(wall_seconds(few, extra, root / "few"))
                runs_many.append(wall_seconds(many, extra, root / "many"))
                print(f"{name}: run {repeat + 1}: {FEW} films {runs_few[-1]:.1f} s, {args.images} films "
                      f"{runs_many[-1]:.1f} s", file=sys.stderr)
            many_s, few_s = statistics.median(runs_many), statistics.median(runs_few)
            steady = (args.images - FEW) / (many_s - few_s) if many_s > few_s else float("nan")  # nan: lost in noise
            results[name] = (many_s, few_s, args.images / many_s, steady)
        memory = actor_memory(many)
    load_after = os.getloadavg()

    lines = [
        "# Archive scoring benchmark (python -m pneunet predict, one process and --ray)",
        "",
        f"Written by `python -m tests.benchmarks.bench_cluster --images {args.images} --repeats {args.repeats}` on "
        f"{time.strftime('%Y-%m-%d')}. Machine: {machine()}; load average {load_before[0]:.1f} before and "
        f"{load_after[0]:.1f} after (other work shared the cores). Python {platform.python_version()}, Ray "
        f"{ray.__version__}, onnxruntime {onnxruntime.__version__}, model `{model}`.",
        "",
        f"Each figure is the median of {args.repeats} runs of the whole command in a fresh interpreter on "
        f"{args.images} Kermany test films (normal and pneumonia in turn, symlinked into one folder; past the "
        f"test set's 624 films each is linked again under another name), so it includes "
        f"loading the model and, for `--ray local`, starting a local Ray cluster and its actors. The start-up run "
        f"scores {FEW} films; the steady rate is ({args.images} - {FEW}) / (wall time of {args.images} - wall time of "
        f"{FEW}): what another film costs once everything runs.",
        "",
        f"| way | wall s, {args.images} films | wall s, {FEW} films (start-up) | images/s end to end | images/s steady |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (many_s, few_s, end_to_end, steady) in results.items():
        lines.append(f"| {name} | {many_s:.1f} | {few_s:.1f} | {end_to_end:.1f} | {steady:.1f} |")
    steady = {name: values[3] for name, values in results.items()}
    one, two, wide = (steady[f"Ray, {way}"] for way in ("1 actor x 1 thread", "2 actors x 1 thread", "1 actor x 2 threads"))
    cli = steady["one process (CLI), 1 thread"]
    lines += [
        "",
        f"On this machine, steady: 2 actors of 1 thread score {two / one:.2f}x as fast as 1 actor of 1 thread, and "
        f"1 actor of 2 threads {wide / one:.2f}x; 1 actor of 1 thread runs at {one / cli:.2f}x the single process "
        "on 1 thread (the same work plus Ray's hand-over of each batch).",
    ]
    lines += [
        "",
        "Memory of one scoring actor (`pneunet.cluster.ScoreImages`, 1 thread; resident set size from "
        "/proc/self/status inside the actor):",
        "",
        f"- an idle Ray worker process: {memory['idle_worker_mb']:.0f} MB",
        f"- the actor with the Predictor loaded (classifier, lung-field segmenter, input gate): {memory['loaded_mb']:.0f} MB",
        f"- its peak after a batch of 16 films: {memory['peak_after_batch_16_mb']:.0f} MB, and after a batch of 64: "
        f"{memory['peak_after_batch_64_mb']:.0f} MB",
        "",
        "## Sizing a cluster",
        "",
        "An actor is one process holding one Predictor; it asks Ray for `--threads` CPUs and runs onnxruntime on "
        "that many threads, so a node runs about *cores / threads per actor* actors, which is what `--actors` "
        "defaults to (the cluster's CPUs / `--threads`). Compare the rows above on your nodes before choosing: "
        "several 1-thread actors keep every core busy with decoding, the lung-field segmenter and the classifier "
        "(Python, Pillow and two small networks per film), while one actor with more threads only parallelises "
        "the networks. Give each actor its peak resident set above plus the batch's decoded films (a 224 px "
        "JPEG is small; a full-size DICOM is tens of MB decoded), and leave the object store (Ray's default, 30 % "
        "of the node's memory) and the OS their share. `--batch-size` (default 16, as the single-machine loop) "
        "is images per model call: larger batches amortise per-call overhead a little and raise the actor's peak "
        "memory; smaller ones balance a short list across more actors. Start-up is fixed cost (the local cluster, "
        "then every actor loading the model once), so it matters for a folder of hundreds and vanishes for an "
        "archive of hundreds of thousands, where the steady rate times the number of cores is the figure to plan "
        "with. Every node needs this checkout at the same path with training/requirements-cluster.txt installed.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200, help="films per timed run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per way, median reported (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "docs" / "cluster_benchmark.md"), help="report (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
