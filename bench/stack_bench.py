"""Benchmark of the local stack (not a test): cold `up` time, idle memory of the three servers,
and listing pending datasets with 1,000 datasets in the bucket.

    .venv/bin/python bench/stack_bench.py [--datasets 1000] [--idle 30] [--json out.json]

Starts its own stack in a temporary directory on free ports, stops it at the end, and prints a
markdown block for docs/benchmarks.md ("## Local stack").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cns.config import LimitsConfig  # noqa: E402
from tasks import bucket, s3, stack  # noqa: E402


def free_ports() -> dict[str, int]:
    rng = random.Random()
    while True:
        ports = {"s3": rng.randrange(20000, 22000), "mlflow": rng.randrange(23000, 26000),
                 "prefect": rng.randrange(26000, 29000), "events": rng.randrange(29000, 30000)}
        config = stack.StackConfig(ports=ports)
        if all(stack._port_free(p) for name in stack.SERVICES for p in config.service_ports(name)):
            return ports


def memory_mb(config: stack.StackConfig) -> dict[str, dict[str, float]]:
    """RSS and PSS (shared pages split between processes) per service, summed over its group."""
    result = {}
    for item in stack.status(config):
        rss = pss = 0
        for pid in stack._group_members(item.pid):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        result[item.name] = {"rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}
    return result


def cpu_seconds(config: stack.StackConfig) -> dict[str, float]:
    """CPU time (user + system) each service's process group has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    result = {}
    for item in stack.status(config):
        total = 0
        for pid in stack._group_members(item.pid):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        result[item.name] = round(total / ticks, 1)
    return result


def tiny_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def fill(client, bucket_name: str, count: int) -> float:
    def one(i: int) -> None:
        prefix = f"incoming/bench-{i:04d}/"
        for j in range(3):
            client.put_object(Bucket=bucket_name, Key=f"{prefix}{j}.png", Body=tiny_png(i * 10 + j))
        client.put_object(Bucket=bucket_name, Key=prefix + "concept.yaml",
                          Body=f"token: '<b{i:04d}>'\nclass_noun: thing\n".encode())

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - start


def main() -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds to wait before measuring idle memory")
    parser.add_argument("--repeat", type=int, default=5, help="warm listings to time")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        os.environ.pop(var, None)
    out: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
                 "python": platform.python_version(), "loadavg_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="cns-stack-bench-") as tmp:
        config = stack.StackConfig.resolve(root=tmp, ports=free_ports(), bucket="bench")
        try:
            start = time.perf_counter()
            _, creds = stack.up(config, timeout=120)
            out["up_cold_s"] = round(time.perf_counter() - start, 2)
            out["up_cpu_s"] = cpu_seconds(config)
            time.sleep(args.idle)
            out["idle_after_s"] = args.idle
            out["memory"] = memory_mb(config)
            out["idle_rss_total_mb"] = round(sum(m["rss_mb"] for m in out["memory"].values()), 1)
            out["idle_pss_total_mb"] = round(sum(m["pss_mb"] for m in out["memory"].values()), 1)

            os.environ.update(stack.client_env(config, creds, with_secret=True))
            client = s3.client()
            out["datasets"] = args.datasets
            out["fill_s"] = round(fill(client, config.bucket, args.datasets), 1)
            cache = Path(tmp) / "hash-cache.json"
            limits = LimitsConfig()
            start = time.perf_counter()
            found = bucket.scan(client, config.bucket, limits=limits, lineage=None, cache=bucket.HashCache(cache))
            out["scan_first_s"] = round(time.perf_counter() - start, 2)
            assert sum(d.state == "pending" for d in found) == args.datasets, "not every dataset listed pending"
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                found = bucket.scan(client, config.bucket, limits=limits, lineage=None,
                                    cache=bucket.HashCache(cache))
                times.append(time.perf_counter() - start)
            assert sum(d.state == "pending" for d in found) == args.datasets
            out["scan_known_s"] = {"median": round(statistics.median(times), 3), "max": round(max(times), 3)}
            start = time.perf_counter()
            stopped = stack.down(config)
            out["down_s"] = round(time.perf_counter() - start, 2)
            assert stopped == ["prefect", "mlflow", "s3"]
        finally:
            stack.down(config)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
