"""``python -m pneunet predict --ray``: a local 2-CPU Ray cluster (loopback only) scores real Kermany test films
and bad files row for row as the single-process CLI does; the CSV writer writes the CLI's CSV; serving never
imports ray."""

from __future__ import annotations

import csv
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pneunet.cli import CSV_FIELDS, main
from tests.helpers import REPO_ROOT, free_port, require_data

# No usage telemetry; Ray takes 127.0.0.1 as the node's address and binds its servers there only; the cluster
# and its driver share a token of their own (nothing read from or written to ~/.ray).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += children.get(current, [])
    return found


def listening_addresses(pids: set[int]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the TCP sockets these processes listen on (/proc/net/tcp, tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        except OSError:
            continue
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # host byte order, 32 bits at a time
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(raw)
                addresses.add(getattr(address, "ipv4_mapped", None) or address)
    return addresses


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` with 2 CPUs on 127.0.0.1 and its own temp dir; stopped (SIGTERM: it stops
    what it started) at the end. Yields (address, the head process)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = Path(temp_dir) / "head.log"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
               "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               "--object-store-memory=200000000"]
    with open(log, "wb") as handle:
        head = subprocess.Popen(command, env={**os.environ, **RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                                stdout=handle, stderr=subprocess.STDOUT)  # no drain: stop at once on SIGTERM
    started = {head.pid}
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        started = descendants(head.pid)
        yield f"127.0.0.1:{port}", head
        started = descendants(head.pid)
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in started):
            time.sleep(0.5)
        left = [pid for pid in started if Path(f"/proc/{pid}").exists()]
        for pid in left:  # only processes this cluster started, by id
            os.kill(pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"ray start left processes {left} running after SIGTERM"


def films_and_bad_files(folder: Path) -> None:
    """6 normal and 6 pneumonia Kermany test films, a truncated JPEG, a text file named .png and a colour
    photograph (which the input gate refuses)."""
    import numpy as np
    from PIL import Image
    from skimage import data as samples

    test = require_data() / "test"
    folder.mkdir()
    for label in ("NORMAL", "PNEUMONIA"):
        for path in sorted((test / label).glob("*.jpeg"))[:6]:
            shutil.copy(path, folder / path.name)
    film = sorted((test / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    (folder / "truncated.jpeg").write_bytes(film[: len(film) // 2])
    (folder / "notes.png").write_text("not an image\n")
    Image.fromarray(np.asarray(samples.astronaut())).save(folder / "astronaut.jpeg")


def test_ray_scores_films_and_bad_files_row_for_row_as_the_single_process_cli(ray_head, tmp_path):
    import pyarrow.parquet as pq

    address, head = ray_head
    folder = tmp_path / "scans"
    films_and_bad_files(folder)
    listed = tmp_path / "more.txt"  # a list of files: a URI, a relative path (from the list's folder), a missing file
    listed.write_text(f"# films\n{(folder / 'IM-0001-0001.jpeg').as_uri()}\n\nscans/notes.png\nmissing.jpeg\n")
    single = tmp_path / "single.csv"
    assert main(["predict", str(folder), "--csv", str(single), "--quiet"]) == 1
    expected = list(csv.DictReader(open(single)))
    assert len(expected) == 15

    out = tmp_path / "results.parquet"
    done = subprocess.run([sys.executable, "-m", "pneunet", "predict", "--ray", address, str(folder), str(listed),
                           "--out", str(out), "--actors", "2", "--batch-size", "4", "--threads", "1", "--quiet"],
                          cwd=REPO_ROOT, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "wrote 18 rows" in done.stderr, done.stderr[-3000:]  # exit 1: some files failed
    table = pq.read_table(out)
    assert table.column_names == CSV_FIELDS
    rows = table.to_pylist()
    assert len(rows) == len(expected) + 3 and not Path(f"{out}.part").exists()

    # the folder: in input order, every cell as the CLI wrote it; probability_value to its 6 printed digits
    # (the batches differ, and a float32 network may differ in the last bit between batch sizes)
    for got, want in zip(rows, expected):
        assert {k: v for k, v in got.items() if k != "probability_value"} == \
            {k: v for k, v in want.items() if k != "probability_value"}
        assert (got["probability_value"] == want["probability_value"] == "" or
                abs(float(got["probability_value"]) - float(want["probability_value"])) <= 1e-6)
    reasons = {Path(row["path"]).name: row["error"] for row in rows[:15] if row["error"]}
    assert set(reasons) == {"truncated.jpeg", "notes.png", "astronaut.jpeg"}
    assert reasons["truncated.jpeg"].startswith("image data is damaged or truncated")
    assert reasons["notes.png"].startswith("not a recognised image file")
    assert "colour picture" in reasons["astronaut.jpeg"]
    assert sum(row["label"] == "pneumonia" for row in rows[:15]) >= 3  # real films, real answers
    assert {row["label"] for row in rows[:15] if not row["error"]} == {"normal", "pneumonia"}

    # the list: the URI scores as the same film did, the relative path is the list folder's, a missing file says so
    uri, notes, missing = rows[15:]
    assert uri["path"] == (folder / "IM-0001-0001.jpeg").as_uri()
    film = next(row for row in rows if row["path"] == str(folder / "IM-0001-0001.jpeg"))
    assert (uri["label"], uri["pneumonia_probability"]) == (film["label"], film["pneumonia_probability"])
    assert notes["path"] == str(tmp_path / "scans" / "notes.png") and notes["error"] == reasons["notes.png"]
    assert missing["path"] == str(tmp_path / "missing.jpeg") and missing["error"] == "no such file"
    # one reason per failed file on stderr, and the summary, as on one machine
    assert f"{folder / 'notes.png'}: not a recognised image file" in done.stderr
    assert f"wrote 18 rows to {out} (5 failed)" in done.stderr

    # the cluster listened on the loopback interface only
    addresses = listening_addresses(descendants(head.pid))
    assert addresses and all(address.is_loopback for address in addresses), addresses


def test_csv_out_is_the_single_process_csv_byte_for_byte(tmp_path):
    from pneunet.cluster import write_rows

    folder = tmp_path / "scans"
    films_and_bad_files(folder)
    single = tmp_path / "single.csv"
    main(["predict", str(folder), "--csv", str(single), "--quiet"])
    failed = []
    assert write_rows(csv.DictReader(open(single)), tmp_path / "out.csv", on_error=failed.append) == (15, 3)
    assert (tmp_path / "out.csv").read_bytes() == single.read_bytes()
    assert [Path(row["path"]).name for row in failed] == ["astronaut.jpeg", "notes.png", "truncated.jpeg"]


def test_predict_without_ray_never_imports_it_and_ray_options_are_checked(tmp_path, capsys):
    image = sorted((require_data() / "test" / "NORMAL").glob("*.jpeg"))[0]
    code = (f"import sys\nfrom pneunet.cli import main\nassert main(['predict', {str(image)!r}, '--quiet']) == 0\n"
            "assert not {'ray', 'pyarrow'} & set(sys.modules), 'serving imported ray or pyarrow'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # a folder right after a bare --ray is not taken for a cluster address
    with pytest.raises(SystemExit):
        main(["predict", "--ray", str(image.parent), str(image), "--out", str(tmp_path / "r.parquet")])
    assert "is not a Ray address" in capsys.readouterr().err
    assert main(["predict", str(image), "--out", str(tmp_path / "r.parquet")]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert main(["predict", "--ray", "local", str(image), "--out", str(tmp_path / "r.json")]) == 2
    assert "write .parquet or .csv" in capsys.readouterr().err
