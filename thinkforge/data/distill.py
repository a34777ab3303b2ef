"""Distillation: every problem K times through a teacher, written as it arrives, resumable.

A teacher is any OpenAI-compatible endpoint (`--teacher http://host:port/v1[#model]`) or a local
checkpoint run through the backend interface (`native`, `hf`, `vllm`). Several endpoints serving the same
model (`--teacher http://a:8000/v1,http://b:8000/v1`, e.g. one vLLM server per GPU or node) are one teacher
fanned out: `concurrency` requests in flight per endpoint, each request sent to the least busy endpoint
that did not just fail, so a dead or overloaded server's share moves to the others. Which endpoint
answered does not change a row (seeds are per (problem, sample)); each row records it. For the HTTP path the
`openai` client is used with its own retries switched off (`max_retries=0`): the loop here retries
429/5xx/timeouts/dropped connections with exponential backoff and full jitter, waits at least what a
`Retry-After` header asks, and records how many attempts each row took.

The output is append-only jsonl, one row per (problem id, sample index), flushed and fsync'd per row
by a single writer thread, so a SIGKILL loses at most the row being written. Re-running the same
command reads the file back, cuts a torn last line, and requests only the (problem, sample) pairs
that have no row yet. Totals (tokens, cost, retries, failures) go to `<out>.summary.json`.

The settings that decide how a response is drawn (teacher model, temperature, top_p, max_tokens, system
prompt) are recorded in `<out>.settings.json` before the first row is written; resuming into a file
drawn under other settings is refused (`allow_settings_change` appends anyway and records both), so
one file never silently mixes two teachers or two temperatures. Which problems and how many samples
(tasks, limit, n) may change between runs: they only add rows drawn the same way.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.tasks.base import Problem
from thinkforge.utils import append_jsonl, asdict, atomic_write_json, read_jsonl, run_metadata

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}


@dataclass
class DistillConfig:
    teacher: str = ""  # base URL (openai) or checkpoint dir / hub id (native, hf, vllm)
    tasks: list[str] = field(default_factory=lambda: ["arith", "code"])
    n: int = 4  # samples per problem
    out: str = "traces.jsonl"
    backend: str = "auto"  # auto = openai for http(s) URLs, else native
    split: str = "train"  # benchmarks only have "test": they fall back to their own split
    limit: int | None = 100  # problems per task (None = the task's default count)
    concurrency: int = 16
    max_retries: int = 6
    timeout: float = 600.0  # seconds per request
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    price_in: float = 0.0  # USD per 1M prompt tokens
    price_out: float = 0.0  # USD per 1M completion tokens
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 4096
    system_prompt: str | None = None
    seed: int = 0
    api_key: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_settings_change: bool = False  # resume into a file drawn under other settings (mixes them)


@dataclass
class Job:
    problem: Problem
    sample: int
    messages: list[dict[str, str]]

    @property
    def key(self) -> str:
        return row_key(self.problem.id, self.sample)

    @property
    def seed(self) -> int:
        # Per-(problem, sample) seed: a resumed run asks for the same sample it would have asked for.
        return int(hashlib.sha1(self.key.encode()).hexdigest()[:8], 16)


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1
    latency_s: float = 0.0
    endpoint: str = ""  # the URL that answered (fan-out over several endpoints)


class RequestFailed(Exception):
    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


def row_key(problem_id: str, sample: int) -> str:
    return f"{problem_id}#{sample}"


def resolve_backend(cfg: DistillConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "openai" if cfg.teacher.startswith(("http://", "https://")) else "native"


# ---------------------------------------------------------------- resume

def repair_tail(path: Path) -> int:
    """Cuts a torn last line (a write interrupted by a kill) so appends start on a fresh line.
    Returns the number of bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # Scan back for the last newline in blocks; everything after it is the torn row.
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def load_done(path: Path) -> dict[str, dict[str, Any]]:
    """Existing rows by key; a duplicate key (impossible unless the file was edited) keeps the first."""
    if not path.exists():
        return {}
    done: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(read_jsonl(path, tolerate_partial_last_line=True), 1):
        if "problem_id" not in row or "sample" not in row:
            raise ThinkforgeError(f"{path}:{i}: not a distill row (missing 'problem_id'/'sample'); "
                                  "use a fresh --out file")
        done.setdefault(row_key(row["problem_id"], int(row["sample"])), row)
    return done


def settings_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".settings.json")


def draw_settings(cfg: DistillConfig, teacher_model: str) -> dict[str, Any]:
    """What decides how every row's response is drawn (the served model name for an HTTP teacher, so a
    restarted server on another port still resumes)."""
    return {"teacher": teacher_model, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens, "system_prompt": cfg.system_prompt}


def record_settings(out: Path, settings: dict[str, Any], done: dict[str, dict[str, Any]], allow: bool) -> None:
    """Refuses to add rows to a file whose existing rows were drawn under other settings, then records
    `settings` beside it (before any new row). A file from before settings were recorded is checked on
    what its rows carry (teacher, temperature)."""
    path = settings_path(out)
    record: dict[str, Any] = {}
    saved = None
    if done and path.exists():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            saved = record["settings"]
        except (ValueError, KeyError, TypeError):
            raise ThinkforgeError(f"{path}: unreadable settings record; delete it to resume {out}") from None
    elif done:
        first = next(iter(done.values()))
        saved = {"teacher": str(first.get("teacher", "")).rpartition("#")[2], "temperature": first.get("temperature")}
    changed = {k: (v, settings.get(k)) for k, v in (saved or {}).items() if v != settings.get(k)}
    if changed and not allow:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ThinkforgeError(f"{out}: its {len(done)} rows were drawn with other settings ({what}); resuming "
                              "would mix them. Use a fresh --out, or --allow-settings-change to append anyway")
    previous = list(record.get("previous", [])) + ([saved] if changed else [])
    atomic_write_json(path, {"settings": settings, "previous": previous})


def build_jobs(cfg: DistillConfig) -> list[Job]:
    from thinkforge.eval.harness import default_split, resolve_task

    if cfg.n < 1:
        raise ThinkforgeError(f"--n must be >= 1, got {cfg.n}")
    jobs: list[Job] = []
    for name in cfg.tasks:
        task = resolve_task(name.strip())
        split = cfg.split if cfg.split in task.splits else default_split(task)
        problems = task.problems(split, n=cfg.limit, seed=cfg.seed)
        if cfg.limit is not None:
            problems = problems[: cfg.limit]
        seen: set[str] = set()
        for p in problems:
            if p.id in seen:  # synthetic train draws may repeat a problem: distil it once
                continue
            seen.add(p.id)
            msgs = task.messages(p, cfg.system_prompt)
            jobs += [Job(p, k, msgs) for k in range(cfg.n)]
    return jobs


# ---------------------------------------------------------------- retries

def retry_after_seconds(headers: Any) -> float | None:
    """`Retry-After` (seconds or an HTTP date) or `retry-after-ms`, if present and sane."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify(err: BaseException) -> tuple[bool, float | None, str]:
    """(retryable, server-requested wait, short reason) for an exception from the openai client."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return True, None, "timeout"
    if isinstance(err, openai.APIConnectionError):
        return True, None, "connection"
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        return status in RETRYABLE_STATUS or status >= 500, retry_after_seconds(err.response.headers), f"http_{status}"
    return False, None, type(err).__name__


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random, server_wait: float | None) -> float:
    """Full-jitter exponential backoff; never shorter than what the server asked for (capped at 10x `cap`,
    so a broken header cannot park a worker for a day)."""
    delay = rng.uniform(0, min(cap, base * 2 ** attempt))
    if server_wait is not None:
        delay = max(delay, min(server_wait, 10 * cap))
    return delay


def with_retries(call: Callable[[], Result], cfg: DistillConfig, rng: random.Random,
                 on_retry: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> Result:
    attempt = 0
    while True:
        try:
            t0 = time.time()
            result = call()
            result.attempts = attempt + 1
            result.latency_s = time.time() - t0
            return result
        except Exception as err:  # noqa: BLE001 - classified below; non-retryable ones are re-raised
            retryable, wait_s, reason = classify(err)
            if not retryable or attempt >= cfg.max_retries:
                raise RequestFailed(f"{reason}: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                                    attempt + 1) from err
            if on_retry:
                on_retry(reason)
            delay = backoff_delay(attempt, cfg.backoff_base, cfg.backoff_max, rng, wait_s)
            if stop is not None and stop.wait(delay):
                raise RequestFailed("interrupted", attempt + 1) from err
            elif stop is None:
                time.sleep(delay)
            attempt += 1


# ---------------------------------------------------------------- teachers

class OpenAITeacher:
    """Chat completions over HTTP with the official client, one request per (problem, sample)."""

    def __init__(self, cfg: DistillConfig, teacher: str | None = None) -> None:
        import openai

        url, _, name = (teacher or cfg.teacher).partition("#")
        url = url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        self.client = openai.OpenAI(base_url=url, api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    max_retries=0, timeout=cfg.timeout)
        self.cfg = cfg
        if not name:
            def first_model() -> Result:
                data = self.client.models.list().data
                return Result(data[0].id if data else "", "", 0, 0)

            try:
                name = with_retries(first_model, cfg, random.Random(cfg.seed)).text
            except RequestFailed as err:
                raise ThinkforgeError(f"distill: cannot list models at {url} ({err})") from None
            if not name:
                raise ThinkforgeError(f"distill: {url}/models lists no model; pass --teacher URL#model")
        self.model = name
        self.url = url

    def request(self, job: Job) -> Result:
        cfg = self.cfg
        r = self.client.chat.completions.create(
            model=self.model, messages=job.messages, temperature=cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_tokens, n=1, seed=request_seed(cfg, job))
        if not r.choices:
            raise ThinkforgeError("teacher returned no choices")
        choice = r.choices[0]
        usage = r.usage
        return Result(choice.message.content or "", choice.finish_reason or "stop",
                      usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                      endpoint=self.url)

    def close(self) -> None:
        self.client.close()


def teacher_urls(teacher: str) -> list[str]:
    return [t.strip() for t in teacher.split(",") if t.strip()]


class TeacherPool:
    """Several endpoints of one teacher model. Each request goes to the endpoint with the fewest requests
    in flight among those whose last request did not fail (all of them when every one just failed)."""

    def __init__(self, cfg: DistillConfig) -> None:
        urls = teacher_urls(cfg.teacher)
        self.teachers: list[OpenAITeacher] = []
        try:
            for url in urls:
                self.teachers.append(OpenAITeacher(cfg, url))
        except BaseException:
            self.close()
            raise
        models = sorted({t.model for t in self.teachers})
        if len(models) > 1:
            self.close()
            raise ThinkforgeError(f"distill: the teacher endpoints serve different models ({', '.join(models)}); "
                                  "one file holds one teacher's rows (pass URL#model to pin one)")
        self.model = models[0]
        self.inflight = [0] * len(self.teachers)
        self.failed = [False] * len(self.teachers)
        self.answered = [0] * len(self.teachers)
        self.lock = threading.Lock()

    def request(self, job: Job) -> Result:
        with self.lock:
            i = min(range(len(self.teachers)), key=lambda k: (self.failed[k], self.inflight[k], k))
            self.inflight[i] += 1
        try:
            result = self.teachers[i].request(job)
        except BaseException:
            with self.lock:
                self.failed[i] = True
            raise
        else:
            with self.lock:
                self.failed[i] = False
                self.answered[i] += 1
            return result
        finally:
            with self.lock:
                self.inflight[i] -= 1

    def per_endpoint(self) -> dict[str, int]:
        return {t.url: n for t, n in zip(self.teachers, self.answered, strict=True)}

    def close(self) -> None:
        for t in self.teachers:
            t.close()


# ---------------------------------------------------------------- the run

def request_seed(cfg: DistillConfig, job: Job) -> int:
    return (cfg.seed * 1_000_003 + job.seed) % 2**31


def make_row(job: Job, res: Result, cfg: DistillConfig, teacher: str) -> dict[str, Any]:
    cost = (res.prompt_tokens * cfg.price_in + res.completion_tokens * cfg.price_out) / 1e6
    return {
        "id": job.key, "problem_id": job.problem.id, "sample": job.sample, "task": job.problem.task,
        "problem": job.problem.to_dict(), "messages": job.messages, "response": res.text,
        "finish_reason": res.finish_reason,
        "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens},
        "cost_usd": round(cost, 8), "teacher": teacher, "attempts": res.attempts,
        "latency_s": round(res.latency_s, 4), "temperature": cfg.temperature, "seed": request_seed(cfg, job),
    }


def totals(rows: list[dict[str, Any]] | Any) -> dict[str, Any]:
    out = {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "per_task": {}}
    for row in rows:
        usage = row.get("usage") or {}
        out["rows"] += 1
        out["prompt_tokens"] += int(usage.get("prompt_tokens", 0))
        out["completion_tokens"] += int(usage.get("completion_tokens", 0))
        out["cost_usd"] += float(row.get("cost_usd", 0.0))
        task = out["per_task"].setdefault(row.get("task", "?"), {"rows": 0, "completion_tokens": 0})
        task["rows"] += 1
        task["completion_tokens"] += int(usage.get("completion_tokens", 0))
    out["cost_usd"] = round(out["cost_usd"], 6)
    return out


def distill(cfg: DistillConfig, progress: Any = None) -> dict[str, Any]:
    """Runs (or resumes) a distillation; returns the summary also written to `<out>.summary.json`."""
    if not cfg.teacher:
        raise ThinkforgeError("distill: --teacher is required (a URL like http://host:8000/v1 or a checkpoint)")
    if cfg.concurrency < 1:
        raise ThinkforgeError(f"--concurrency must be >= 1, got {cfg.concurrency}")
    if cfg.max_retries < 0:
        raise ThinkforgeError(f"--max-retries must be >= 0, got {cfg.max_retries}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torn = repair_tail(out)
    done = load_done(out)
    jobs = build_jobs(cfg)
    pending = [j for j in jobs if j.key not in done]
    backend = resolve_backend(cfg)
    t0 = time.time()
    stats = {"requested": len(pending), "written": 0, "failed": 0, "retries": 0, "retry_reasons": {},
             "torn_bytes_removed": torn, "already_done": len(jobs) - len(pending)}
    failures: list[dict[str, Any]] = []
    lock = threading.Lock()
    task_id = progress.add_task("distill", total=len(jobs), completed=len(jobs) - len(pending)) if progress else None
    run_tokens = {"in": 0, "out": 0, "cost": 0.0}

    def on_retry(reason: str) -> None:
        with lock:
            stats["retries"] += 1
            stats["retry_reasons"][reason] = stats["retry_reasons"].get(reason, 0) + 1

    def write(row: dict[str, Any]) -> None:
        append_jsonl(out, row)
        stats["written"] += 1
        run_tokens["in"] += row["usage"]["prompt_tokens"]
        run_tokens["out"] += row["usage"]["completion_tokens"]
        run_tokens["cost"] += row["cost_usd"]
        if progress:
            progress.update(task_id, advance=1, description=(
                f"distill {run_tokens['out']:,} tok out, ${run_tokens['cost']:.4f}"
                + (f", {stats['retries']} retries" if stats["retries"] else "")))

    teacher = TeacherPool(cfg) if pending and backend == "openai" else None
    if pending:
        try:
            record_settings(out, draw_settings(cfg, teacher.model if teacher else cfg.teacher), done,
                            cfg.allow_settings_change)
        except ThinkforgeError:
            if teacher is not None:
                teacher.close()
            raise
    if teacher is not None:
        stop = threading.Event()

        def run(job: Job) -> Result:
            rng = random.Random(f"{cfg.seed}/{job.key}")
            return with_retries(lambda: teacher.request(job), cfg, rng, on_retry, stop)

        window = cfg.concurrency * len(teacher.teachers)  # `concurrency` per endpoint
        pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="distill")
        try:
            # A bounded window of in-flight futures keeps memory flat for millions of jobs.
            queue = iter(pending)
            inflight: dict[Future, Job] = {}
            for job in queue:
                inflight[pool.submit(run, job)] = job
                if len(inflight) >= 2 * window:
                    break
            while inflight:
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = inflight.pop(fut)
                    try:
                        res = fut.result()
                        write(make_row(job, res, cfg, f"{res.endpoint}#{teacher.model}"))
                    except (RequestFailed, ThinkforgeError) as err:
                        stats["failed"] += 1
                        failures.append({"id": job.key, "error": str(err),
                                         "attempts": getattr(err, "attempts", 1)})
                        if progress:
                            progress.update(task_id, advance=1)
                    nxt = next(queue, None)
                    if nxt is not None:
                        inflight[pool.submit(run, nxt)] = nxt
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            teacher.close()
            stats["per_endpoint"] = teacher.per_endpoint()
    elif pending:
        if len(teacher_urls(cfg.teacher)) > 1:
            raise ThinkforgeError("distill: a comma list of teachers fans out over HTTP endpoints only")
        _distill_local(cfg, backend, pending, write)
    wall = time.time() - t0
    all_rows = read_jsonl(out, tolerate_partial_last_line=True) if out.exists() else []
    summary = {
        "out": str(out), "teacher": cfg.teacher, "backend": backend, "jobs": len(jobs),
        "complete": stats["failed"] == 0 and len(all_rows) >= len(jobs),
        "totals": totals(all_rows),
        "this_run": {**stats, "wall_s": round(wall, 3), "prompt_tokens": run_tokens["in"],
                     "completion_tokens": run_tokens["out"], "cost_usd": round(run_tokens["cost"], 6),
                     "rows_per_s": round(stats["written"] / wall, 3) if wall > 0 else None,
                     "completion_tokens_per_s": round(run_tokens["out"] / wall, 1) if wall > 0 else None},
        "failures": failures[:50],
        **run_metadata({k: v for k, v in asdict(cfg).items() if k != "api_key"}, cfg.seed),
    }
    atomic_write_json(summary_path(out), summary)
    return summary


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def _distill_local(cfg: DistillConfig, backend: str, pending: list[Job], write: Callable[[dict], None]) -> None:
    """Local teachers: chunks of jobs through `Backend.chat`, one sampling seed per sample index."""
    from thinkforge.engine.base import SamplingParams, get_backend

    engine = get_backend(backend, cfg.teacher, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    try:
        chunk = max(cfg.concurrency, 1) * 4
        by_sample: dict[int, list[Job]] = {}
        for job in pending:
            by_sample.setdefault(job.sample, []).append(job)
        for sample, group in sorted(by_sample.items()):
            params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                    seed=cfg.seed * 1_000_003 + sample)
            for start in range(0, len(group), chunk):
                part = group[start:start + chunk]
                t0 = time.time()
                outs = engine.chat([j.messages for j in part], params)
                latency = (time.time() - t0) / max(len(part), 1)
                for job, comps in zip(part, outs, strict=True):
                    c = comps[0]
                    write(make_row(job, Result(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens,
                                               1, latency), cfg, cfg.teacher))
    finally:
        engine.close()
