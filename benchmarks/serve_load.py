"""Load test of `thinkforge serve`: many concurrent `openai` clients, with abusive clients in the same run.

    python benchmarks/serve_load.py --out benchmarks/results/serve_load.json [--duration 60 --concurrency 256]

Server: the real CLI (`thinkforge serve` in a subprocess, API key from THINKFORGE_API_KEY, default limits)
on a loopback port, over a random Qwen2 of the speedrun's "tiny" shape (hidden 128, 4 layers) built from
`--seed`. Well-behaved clients: `--concurrency` AsyncOpenAI clients (each its own connection pool) loop
over a mix of /v1/completions and /v1/chat/completions, a quarter of them streamed, `--max-tokens` each,
until `--duration` seconds are up (a 429 is waited out as its Retry-After says). After the first
`--warmup-frac` of the window the abuse starts and runs to the end:
- slowloris: `--slowloris` raw sockets, half stalling after half a request head, half after the head
  and half the body; each is reopened as soon as the server closes it;
- `--big-prompts` requests with a 10 MB prompt through the openai client (expected: 413);
- `--disconnects` streaming requests that hang up as soon as the first generated token arrives
  (expected: their generations aborted, so the engine is idle once the clients stop), from
  `--disconnect-workers` clients at once (admission is FIFO, so each waits its turn like everyone).
The server runs `--server-threads` torch threads (1: on 2 shared cores, OpenMP threads spinning at
barriers made 2 threads 13x slower than 1 for the engine).
Reported: completions/s, p50/p99 latency and the status counts of the well-behaved clients before and
during the abuse, what each kind of abuse got, the server's RSS before/after/peak, and a verdict (exit
code 1 when it fails): zero 5xx, server alive, >= 99% well-behaved success, every 10 MB prompt 413,
engine idle after the run, every hang-up aborted, stalled sockets cut off. Only loopback addresses;
every loop is bounded by the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST = "127.0.0.1"
NAME = "tiny"
WORDS = ("what is 12 + 35 ? let me think step by step . the answer is 47 solve for x : 3x + 5 = 20 "
         "def add ( a , b ) : return a + b quick brown fox reasoning models think before they answer").split()
BIG_PROMPT_CHARS = 10_000_000


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


class Record:
    """Outcomes of the well-behaved clients per phase: status (int, or a client-side error name) and latency."""

    def __init__(self) -> None:
        self.status: dict[str, Counter] = {"baseline": Counter(), "abuse": Counter()}
        self.latency: dict[str, list[float]] = {"baseline": [], "abuse": []}
        self.tokens: dict[str, int] = {"baseline": 0, "abuse": 0}

    def add(self, phase: str, status: int | str, seconds: float, tokens: int = 0) -> None:
        self.status[phase][str(status)] += 1
        if status == 200:
            self.latency[phase].append(seconds)
            self.tokens[phase] += tokens


def classify(err: Exception) -> int | str:
    import openai

    if isinstance(err, openai.APIStatusError):
        return err.status_code
    if isinstance(err, openai.APITimeoutError):
        return "client_timeout"
    if isinstance(err, openai.APIConnectionError):
        return "connection_error"
    if isinstance(err, openai.APIError):  # an error event inside a stream
        return "stream_error"
    return type(err).__name__


async def well_behaved(client: Any, rng: random.Random, args: Any, deadline: float, abuse_at: float,
                       rec: Record) -> None:
    while time.monotonic() < deadline:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
        chat, stream = rng.random() < 0.5, rng.random() < 0.25
        t0 = time.monotonic()
        phase = "abuse" if t0 >= abuse_at else "baseline"
        kw = {"model": NAME, "max_tokens": args.max_tokens, "temperature": 0.8, "seed": rng.randrange(1 << 30)}
        status: int | str = 200
        tokens = 0
        try:
            if chat:
                msgs = [{"role": "user", "content": prompt}]
                if stream:
                    async for chunk in await client.chat.completions.create(messages=msgs, stream=True, **kw):
                        tokens += bool(chunk.choices and chunk.choices[0].delta.content)
                else:
                    tokens = (await client.chat.completions.create(messages=msgs, **kw)).usage.completion_tokens
            elif stream:
                async for chunk in await client.completions.create(prompt=prompt, stream=True, **kw):
                    tokens += bool(chunk.choices and chunk.choices[0].text)
            else:
                tokens = (await client.completions.create(prompt=prompt, **kw)).usage.completion_tokens
        except Exception as err:  # every outcome is counted, none ends the client
            status = classify(err)
        rec.add(phase, status, time.monotonic() - t0, tokens)
        if status == 429:
            await asyncio.sleep(1.0)  # the server's Retry-After


async def slowloris(port: int, key: str, half_head: bool, abuse_at: float, deadline: float,
                    out: Counter, closed_after: list[float]) -> None:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n").encode()
    data = head[:len(head) // 2] if half_head else head + b'{"model": "tiny", "prompt": "' + b"x" * 1900
    await asyncio.sleep(max(0.0, abuse_at - time.monotonic()))
    while time.monotonic() < deadline - 0.5:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            out["connect_failed"] += 1
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(data)
            await writer.drain()
            t = time.monotonic()
            reply = await asyncio.wait_for(reader.read(4096), timeout=max(0.1, deadline - t))
            closed_after.append(time.monotonic() - t)
            out[reply.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without reply"] += 1
        except asyncio.TimeoutError:
            out["still open at the end"] += 1
        except OSError:
            out["reset"] += 1
        finally:
            writer.close()


async def big_prompts(client: Any, count: int, abuse_at: float, deadline: float, out: Counter,
                      seconds: list[float]) -> None:
    prompt = "x" * BIG_PROMPT_CHARS
    gap = (deadline - abuse_at) / max(count, 1)
    for k in range(count):
        await asyncio.sleep(max(0.0, abuse_at + k * gap - time.monotonic()))
        if time.monotonic() >= deadline:
            break
        t = time.monotonic()
        try:
            await client.completions.create(model=NAME, prompt=prompt, max_tokens=4)
            out["200"] += 1
        except Exception as err:
            out[str(classify(err))] += 1
        seconds.append(time.monotonic() - t)


async def disconnector(client: Any, todo: list[int], abuse_at: float, deadline: float, out: Counter) -> None:
    await asyncio.sleep(max(0.0, abuse_at - time.monotonic()))
    while todo[0] > 0 and time.monotonic() < deadline:
        todo[0] -= 1
        try:
            stream = await client.completions.create(model=NAME, prompt="Tell me a long story about a fox",
                                                     max_tokens=400, temperature=1.0, stream=True)
            got = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason is None:
                    got = 1
                    break
            await stream.close()  # hang up mid-stream
            out["hung up mid-stream" if got else "stream ended first"] += 1
        except Exception as err:
            out[str(classify(err))] += 1


async def sample_rss(pid: int, until: list[bool], peak: list[float]) -> None:
    while not until[0]:
        r = rss_mib(pid)
        if r is not None:
            peak[0] = max(peak[0], r)
        await asyncio.sleep(0.5)


async def run_load(args: Any, port: int, key: str, pid: int) -> dict[str, Any]:
    import httpx
    import openai

    ctx = ssl.create_default_context()  # one TLS context for every client (never used: plain http on loopback)

    def new_client(timeout: float) -> Any:
        return openai.AsyncOpenAI(base_url=f"http://{HOST}:{port}/v1", api_key=key, max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(verify=ctx, timeout=timeout))

    clients = [new_client(args.client_timeout) for _ in range(args.concurrency)]
    abusers = [new_client(args.client_timeout) for _ in range(args.disconnect_workers)]
    big_client = new_client(60)
    await clients[0].completions.create(model=NAME, prompt="warm up", max_tokens=4)
    rss_before = rss_mib(pid)
    start = time.monotonic()
    deadline = start + args.duration
    abuse_at = start + args.warmup_frac * args.duration
    rec, slow, big, disc = Record(), Counter(), Counter(), Counter()
    closed_after: list[float] = []
    big_seconds: list[float] = []
    todo = [args.disconnects]
    stop_rss, peak = [False], [rss_before or 0.0]
    rss_task = asyncio.ensure_future(sample_rss(pid, stop_rss, peak))
    tasks = [asyncio.ensure_future(well_behaved(c, random.Random(args.seed * 100003 + i), args, deadline, abuse_at,
                                                rec)) for i, c in enumerate(clients)]
    tasks += [asyncio.ensure_future(slowloris(port, key, i % 2 == 0, abuse_at, deadline, slow, closed_after))
              for i in range(args.slowloris)]
    tasks.append(asyncio.ensure_future(big_prompts(big_client, args.big_prompts, abuse_at, deadline, big,
                                                   big_seconds)))
    tasks += [asyncio.ensure_future(disconnector(c, todo, abuse_at, deadline, disc)) for c in abusers]
    _, late = await asyncio.wait(tasks, timeout=args.duration + args.client_timeout + 10)
    for t in late:
        t.cancel()
    wall = time.monotonic() - start
    # After the load: the engine must go idle (every hung-up stream aborted), and memory settle.
    idle, stats = False, {}
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", headers={"Authorization": f"Bearer {key}"},
                                 timeout=10) as http:
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < 30:
            stats = (await http.get("/stats")).json()
            if stats["running_sequences"] == 0 and stats["waiting_sequences"] == 0 and stats["admitted_requests"] == 0:
                idle = True
                break
            await asyncio.sleep(0.2)
        idle_after = round(time.monotonic() - t_idle, 2)
        health = (await http.get("/health")).status_code
    stop_rss[0] = True
    await rss_task
    for c in [*clients, *abusers, big_client]:
        await c.close()
    phases = {}
    for phase, seconds in (("baseline", abuse_at - start), ("abuse", deadline - abuse_at)):
        counts = rec.status[phase]
        total = sum(counts.values())
        phases[phase] = {"seconds": round(seconds, 1), "requests": total, "status": dict(counts),
                         "success_rate": round(counts["200"] / total, 4) if total else None,
                         "completions_per_s": round(counts["200"] / seconds, 2) if seconds > 0 else None,
                         "tokens_per_s": round(rec.tokens[phase] / seconds, 1) if seconds > 0 else None,
                         "latency_p50_s": pct(rec.latency[phase], 0.5), "latency_p99_s": pct(rec.latency[phase], 0.99)}
    all_status = rec.status["baseline"] + rec.status["abuse"]
    return {"wall_s": round(wall, 1), "phases": phases, "status": dict(all_status),
            "server_5xx": sum(v for k, v in all_status.items() if k.isdigit() and k.startswith("5"))
            + sum(v for k, v in (big + disc).items() if k.isdigit() and k.startswith("5")),
            "slowloris": {"sockets": args.slowloris, "outcomes": dict(slow),
                          "closed_by_server_after_s_p50": pct(closed_after, 0.5)},
            "big_prompts": {"sent": sum(big.values()), "status": dict(big),
                            "seconds_p50": pct(big_seconds, 0.5), "seconds_max": pct(big_seconds, 1.0)},
            "disconnects": {"done": sum(disc.values()), "outcomes": dict(disc)},
            "after": {"engine_idle": idle, "idle_after_s": idle_after, "server_stats": stats, "health": health},
            "rss_mib": {"before": rss_before, "after": rss_mib(pid), "peak": peak[0]}}


def start_server(ckpt: str, port: int, key: str, args: Any, log: Path) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "thinkforge.cli", "serve", "--model", ckpt, "--served-name", NAME, "--host", HOST,
           "--port", str(port), "--device", args.device, "--dtype", "float32", "--body-timeout", str(args.body_timeout),
           "--max-batch-size", str(args.max_batch_size)]
    # Torch threads of the server: OpenMP threads spin at barriers, so on a machine shared with the client
    # process (and here other jobs), 2 threads on 2 cores ran the engine 13x slower than 1.
    env = {**os.environ, "THINKFORGE_API_KEY": key, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": str(args.server_threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("server not healthy after 180 s")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=256, help="well-behaved AsyncOpenAI clients")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup-frac", type=float, default=1 / 6, help="share of the window before the abuse")
    ap.add_argument("--slowloris", type=int, default=128, help="stalling raw sockets held open")
    ap.add_argument("--big-prompts", type=int, default=20, help="10 MB prompts sent during the abuse")
    ap.add_argument("--disconnects", type=int, default=1000, help="streams hung up after the first token")
    ap.add_argument("--disconnect-workers", type=int, default=256, help="hang-up clients running at once")
    ap.add_argument("--device", default="cpu", help="the server's --device")
    ap.add_argument("--server-threads", type=int, default=1, help="the server's torch CPU threads")
    ap.add_argument("--body-timeout", type=float, default=30.0, help="the server's --body-timeout")
    ap.add_argument("--max-batch-size", type=int, default=64, help="the server's --max-batch-size")
    ap.add_argument("--client-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from thinkforge.engine.testing import save_tiny_checkpoint
    from thinkforge.utils import atomic_write_json, run_metadata

    key = "sk-load-" + "".join(random.Random(args.seed).choice("0123456789abcdef") for _ in range(32))
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
        s.close()
        ckpt = str(save_tiny_checkpoint(Path(tmp) / "model", hidden_size=128, num_layers=4, num_heads=4,
                                        num_kv_heads=2, intermediate_size=384, max_position_embeddings=1024,
                                        seed=args.seed))
        log = Path(tmp) / "server.log"
        proc = start_server(ckpt, port, key, args, log)
        try:
            res = asyncio.run(run_load(args, port, key, proc.pid))
            res["server_alive"] = proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            server_log = log.read_text()[-2000:]
    res["server_log_tail"] = server_log
    abuse = res["phases"]["abuse"]
    ok_rate = abuse["success_rate"] if abuse["success_rate"] is not None else res["phases"]["baseline"]["success_rate"]
    checks = {"zero_5xx": res["server_5xx"] == 0, "server_alive": res["server_alive"],
              "well_behaved_success_ge_99pct": (ok_rate or 0) >= 0.99,
              "big_prompts_all_413": res["big_prompts"]["status"].get("413", 0) == res["big_prompts"]["sent"],
              "engine_idle_after": res["after"]["engine_idle"],
              # every hang-up stopped a generation in the engine (timeouts would add to the count, not hide one)
              "hang_ups_aborted": (res["after"]["server_stats"].get("aborted_generations") or 0)
              >= res["disconnects"]["outcomes"].get("hung up mid-stream", 0),
              "slowloris_cut_off": abuse["seconds"] < args.body_timeout
              or any(k.startswith("HTTP/1.1 408") for k in res["slowloris"]["outcomes"])}
    res["checks"], res["ok"] = checks, all(checks.values())

    print(f"\nthinkforge serve under load: {args.concurrency} AsyncOpenAI clients x {args.duration:g} s, "
          f"max_tokens {args.max_tokens}, tiny Qwen2 (hidden 128, 4 layers, {args.device}, {args.server_threads} thread), "
          f"loopback, API key on, {os.cpu_count()} cores")
    print(f"{'phase':<22} {'seconds':>7} {'requests':>8} {'ok %':>6} {'compl/s':>8} {'tok/s':>7} "
          f"{'p50 s':>6} {'p99 s':>6}  status counts")
    for phase, label in (("baseline", "before abuse"), ("abuse", "during abuse")):
        p = res["phases"][phase]
        rate = f"{100 * p['success_rate']:.2f}" if p["success_rate"] is not None else "-"
        print(f"{label:<22} {p['seconds']:>7} {p['requests']:>8} {rate:>6} {p['completions_per_s']!s:>8} "
              f"{p['tokens_per_s']!s:>7} {p['latency_p50_s']!s:>6} {p['latency_p99_s']!s:>6}  {p['status']}")
    sl, bp, dc = res["slowloris"], res["big_prompts"], res["disconnects"]
    print(f"\nabuse during the last {abuse['seconds']} s:")
    print(f"  slowloris  {sl['sockets']} stalling sockets (reopened when closed): {sl['outcomes']}, closed by the "
          f"server after {sl['closed_by_server_after_s_p50']} s (median; --body-timeout {args.body_timeout:g})")
    print(f"  10 MB      {bp['sent']} prompts: {bp['status']}, answered in {bp['seconds_p50']} s median, "
          f"{bp['seconds_max']} s max")
    print(f"  hang-ups   {dc['done']} streams: {dc['outcomes']}")
    st = res["after"]["server_stats"]
    print(f"\nafter the load: engine idle {res['after']['engine_idle']} (in {res['after']['idle_after_s']} s), "
          f"aborted generations {st.get('aborted_generations')}, server rejections {st.get('rejected')}")
    rss = res["rss_mib"]
    print(f"server RSS: {rss['before']} MiB before, {rss['peak']} MiB peak, {rss['after']} MiB after")
    print(f"server 5xx: {res['server_5xx']}; checks: {checks} -> {'PASS' if res['ok'] else 'FAIL'}")

    res.update(run_metadata(dict(vars(args)), seed=args.seed))
    res["load_average_at_end"] = os.getloadavg()
    res["cpu_count"] = os.cpu_count()
    atomic_write_json(args.out, res)
    print(f"\nwrote {args.out}")
    if not res["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
