"""Soak test (not in the default suite): a server under steady mixed-tenant load for N minutes; RSS must stay flat.

Starts `python -m tests.fixtures.server` (the real `prefixserve serve` path, with the tiny model), stores one prefix
per tenant, then loops generate calls
(half streamed, some aborted mid-stream) at a fixed concurrency over loopback, sampling the server's RSS every
`--sample-s`. After a warm-up third, RSS may grow by at most `--max-growth-mb`. Exit 0 = flat, 1 = grew, 2 = errors.

    python scripts/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def seed_prefixes(store_url: str, tenants: int) -> None:
    sys.path.insert(0, str(REPO))
    from prefix_store import open_store
    from tests.fixtures.server import put_random_prefix, tiny_bundle

    bundle = tiny_bundle()
    store = open_store(store_url)
    for t in range(tenants):
        put_random_prefix(store, bundle, f"soak{t}", prefix_length=4 + t % 20, seed=t)
    store.close()


async def load(url: str, tenants: int, concurrency: int, deadline: float, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:

        async def worker(w: int) -> None:
            rnd = random.Random(w)
            while time.monotonic() < deadline:
                body = {
                    "tenant_id": f"soak{rnd.randrange(tenants)}",
                    "prompt": "soak " * rnd.randint(1, 40),
                    "max_tokens": rnd.randint(1, 32),
                    "temperature": rnd.choice([0.0, 0.8]),
                    "stream": rnd.random() < 0.5,
                    "logprobs": rnd.choice([None, None, 0, 3]),
                    "repetition_penalty": rnd.choice([1.0, 1.0, 1.3]),
                }
                try:
                    if body["stream"]:
                        async with c.stream("POST", "/generate", json=body) as r:
                            n = 0
                            async for _line in r.aiter_lines():
                                n += 1
                                if rnd.random() < 0.05:  # client walks away mid-stream
                                    stats["aborted"] += 1
                                    break
                            ok = r.status_code == 200
                    else:
                        r = await c.post("/generate", json=body)
                        ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                stats["ok" if ok else "errors"] += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--max-growth-mb", type=float, default=64.0)
    ap.add_argument(
        "--settings", default="{}", help="more server settings as JSON, e.g. '{\"speculative_tokens\": 4}'"
    )
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="soak-")
    store_url = f"file://{tmp}/store"
    seed_prefixes(store_url, args.tenants)
    port = free_port()
    settings = {"kv_cache_mb": 64, "max_model_len": 512, "training_workers": 0, "log_level": "warning"}
    settings.update(json.loads(args.settings))
    cmd = [sys.executable, "-m", "tests.fixtures.server", "--port", str(port), "--store-url", store_url]
    cmd += ["--settings", json.dumps(settings)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            print("server did not become ready", file=sys.stderr)
            return 2
        stats = {"ok": 0, "errors": 0, "aborted": 0}
        t_end = time.monotonic() + args.minutes * 60
        samples: list[tuple[float, float]] = []

        async def run() -> None:
            task = asyncio.create_task(load(url, args.tenants, args.concurrency, t_end, stats))
            t0 = time.monotonic()
            while not task.done():
                samples.append((time.monotonic() - t0, rss_mb(proc.pid)))
                print(f"t={samples[-1][0]:6.0f}s rss={samples[-1][1]:7.1f} MiB {stats}", flush=True)
                await asyncio.sleep(args.sample_s)
            await task

        asyncio.run(run())
        counters = {}
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            name, _, value = line.partition(" ")
            if name.endswith("_total") and ("spec_decode" in name or "prompt_cache" in name):
                counters[name.removeprefix("prefixserve:")] = float(value)
        print(json.dumps({"engine_counters": counters}))
        warm = [r for t, r in samples if t >= samples[-1][0] / 3] or [samples[-1][1]]
        growth = max(warm) - warm[0]
        print(json.dumps({"requests": stats, "rss_after_warmup_mb": [round(warm[0], 1), round(max(warm), 1)],
                          "growth_mb": round(growth, 1)}))  # fmt: skip
        if stats["errors"]:
            return 2
        return 0 if growth <= args.max_growth_mb else 1
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
