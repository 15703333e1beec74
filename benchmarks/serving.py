"""Serving benchmark: throughput and latency of many adapted models on one shared base.

Deltas are synthesised over the base's SO-trained matrices (`sparseshot.recipe.trainable_weights`;
vision tower by default: serving never reads the text tower's part, see --towers), a fraction
`density` of each matrix's entries changed, written as real SparseDelta files and imported through
the service (`app.services.models.import_model`, the code behind POST /v1/models/import). Rows:

- base: a zero-shot model (bare vision tower, no weight delta);
- one: one adapted model; many: N distinct adapted models, round-robin (default 100);
- zipf: 1000 models drawn with Zipf(1.1) popularity, the prepared-delta cache holding ~100;
- cold: C-1 clients on the warm `one` model while one client asks models never loaded (the row's
  p50/p99 are the cold requests' latencies; img/s counts every client).

Library mode calls the service's own serving path in-process (`app.services.models.classify`:
database lookup, image decoding, scheduler, engine). HTTP mode starts a real `sparseshot serve`
on a free loopback port and sends multipart requests from C threads with httpx clients.

    python -m benchmarks.serving --model ViT-B-32 --threads 2 --json serving.json

The one, many and zipf rows are measured in `--rounds` chunks (default 6) that alternate with
chunks of the base row's requests, and each is divided by that paired base (column "÷ base",
`extra.base_img_s`): on a shared machine whose speed drifts during the run, a ratio then compares
the two measured side by side rather than rows minutes apart.

--json FILE writes {"rows": {name: {...}}, "ratios": {"one_over_base", "many_over_base",
"zipf_over_base"}, "config": {...}} (ratios of img/s to the paired base, library mode, first
density, 1 image/request).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.procs import free_port

CLASSES = ["class-a", "class-b", "class-c", "class-d", "class-e"]
MB = 1024 * 1024


@dataclass
class Config:
    model: str = "ViT-B-32"
    threads: int = 2
    concurrency: int = 8
    images: tuple[int, ...] = (1, 8)
    densities: tuple[float, ...] = field(default_factory=lambda: (0.005, 0.02, default_budget()))
    many: int = 100
    zipf_models: int = 1000
    zipf_s: float = 1.1
    zipf_cache_models: int = 100
    zipf_density: float | None = None  # default: the first density
    cold_models: int = 6
    requests: int = 96  # per row at 1 image/request (scaled down for larger requests)
    towers: str = "vision"
    modes: tuple[str, ...] = ("library", "http")
    http_rows: tuple[str, ...] = ("base", "one", "many", "cold")
    http_images: tuple[int, ...] = (1,)
    row_timeout_s: float = 300.0
    rounds: int = 6  # chunks of a row alternating with chunks of the base (the paired base)
    seed: int = 0

    @property
    def spec(self) -> str:
        return self.model if ":" in self.model else f"{self.model}:random"


@dataclass
class Row:
    img_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    resident_mb: float
    requests: int
    images_per_request: int
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- synthetic deltas


def synth_delta(base: Any, names: Sequence[str], density: float, seed: int) -> bytes:
    """A delta file changing about `density` of the entries of each named matrix, with random
    class embeddings."""
    import torch.nn.functional as F

    from sparseshot.delta import SparseDelta

    g = torch.Generator().manual_seed(seed)
    state = base.model.state_dict()
    meta = {"base_model": base.spec, "base_fingerprint": base.fingerprint, "classes": CLASSES,
            "template": "a photo of a {}.", "method": "so"}
    delta = SparseDelta(meta)
    for n in names:
        flat = state[n].detach().reshape(-1)  # (numel,)
        k = max(1, round(density * flat.numel()))
        idx = torch.randint(0, flat.numel(), (k,), generator=g).unique()  # ~k distinct entries, ascending
        delta.add_sparse(n, state[n], idx, flat[idx] + 0.01 * torch.randn(idx.numel(), generator=g))
    dim = base.model.visual.output_dim
    delta.extras["class_embeddings"] = F.normalize(torch.randn(len(CLASSES), dim, generator=g), dim=-1)
    return delta.to_bytes()


def _png(seed: int, size: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the service, in-process


class Service:
    """A data folder with a migrated database, one tenant and its API key, the models imported; the
    process's runtime context (app.runtime.Runtime: base models, serving) over its settings."""

    def __init__(self, cfg: Config, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self.env = {
            "SPARSESHOT_DATA_DIR": str(root), "SPARSESHOT_BASE_MODEL": cfg.spec, "SPARSESHOT_DEVICE": "cpu",
            "SPARSESHOT_SERVING_QUEUE_IMAGES": "100000", "SPARSESHOT_MAX_FILES_PER_REQUEST": "64",
            "SPARSESHOT_MAX_DELTA_BYTES": str(4096 * MB),
            "SPARSESHOT_MAX_MODELS": "1000000",  # the zipf row alone imports 1000 models for one tenant
        }
        os.environ.update(self.env)
        os.environ.pop("SPARSESHOT_DATABASE_URL", None)
        from app.core.config import get_settings

        get_settings.cache_clear()
        import migrations
        from app.runtime import Runtime
        from app.services import auth

        settings = get_settings()
        migrations.upgrade(settings.database_url)
        self.runtime = Runtime.build(settings)
        with self.session() as s:
            row, self.api_key = auth.create_key(session=s, tenant_name="bench")
            self.tenant_id = row.tenant_id

    def session(self) -> Any:
        from app.db import session_scope

        return session_scope(self.runtime.engine)

    def import_delta(self, data: bytes, name: str) -> str:
        from app.models import Tenant
        from app.services import models
        from app.services.datasets import Upload

        rt = self.runtime
        with self.session() as s:
            tenant = s.get(Tenant, self.tenant_id)
            m = models.import_model(session=s, storage=rt.storage, settings=rt.settings, bases=rt.bases,
                                    tenant=tenant, upload=Upload(f"{name}.safetensors", io.BytesIO(data)),
                                    name=name)
            return m.id

    def zeroshot(self) -> str:
        from app.models import Tenant
        from app.schemas import ZeroshotCreate
        from app.services import models

        rt = self.runtime
        with self.session() as s:
            tenant = s.get(Tenant, self.tenant_id)
            body = ZeroshotCreate(classes=CLASSES)
            return models.create_zeroshot(session=s, storage=rt.storage, settings=rt.settings,
                                          bases=rt.bases, tenant=tenant, body=body).id

    def classify(self, model_id: str, blobs: list[bytes]) -> None:
        from app.models import Tenant
        from app.services import models
        from app.services.datasets import Upload

        rt = self.runtime
        files = [Upload(f"{i}.png", io.BytesIO(b)) for i, b in enumerate(blobs)]
        with self.session() as s:
            tenant = s.get(Tenant, self.tenant_id)
            models.classify(session=s, storage=rt.storage, settings=rt.settings, serving=rt.serving(),
                            tenant=tenant, model_id=model_id, files=files, top_k=5)

    def set_cache_budget(self, nbytes: int) -> None:
        self.runtime.serving().scheduler.cache.budget_bytes = int(nbytes)

    def close(self) -> None:
        """Stop the in-process serving (threads, prepared deltas) and close the database pool."""
        self.runtime.close()


def _rss_mb(pid: int | None = None) -> float:
    path = f"/proc/{pid or 'self'}/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------- load generation


def run_clients(pick: Callable[[int], str], send: Callable[[str, list[bytes]], None], *, requests: int,
                concurrency: int, images: list[bytes], timeout_s: float) -> tuple[list[float], int, float]:
    """C closed-loop clients send `requests` requests (request i for model pick(i)).
    Returns (latencies s, errors, wall s)."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + timeout_s

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                send(pick(i), images)
                ok = True
            except Exception:
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt) if ok else None
                errors[0] += 0 if ok else 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return latencies, errors[0], time.perf_counter() - t0


def _row(lat: list[float], errors: int, wall: float, n_images: int, per_req: int, rss: float) -> Row:
    lat_ms = sorted(x * 1000 for x in lat) or [float("nan")]
    p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
    return Row(img_s=n_images / wall if wall else 0.0, p50_ms=statistics.median(lat_ms), p99_ms=p99,
               errors=errors, resident_mb=rss, requests=len(lat) + errors, images_per_request=per_req)


def zipf_picks(n_models: int, s: float, count: int, seed: int) -> list[int]:
    weights = [1.0 / (r + 1) ** s for r in range(n_models)]
    return random.Random(seed).choices(range(n_models), weights=weights, k=count)


# ---------------------------------------------------------------- the rows of one mode


@dataclass
class Models:
    base: str
    by_density: dict[float, list[str]]  # density -> model ids (first `many` used for one/many)
    zipf: list[str]
    cold: dict[float, list[str]]
    prepared_mb: dict[float, float]


Send = Callable[[str, list[bytes]], None]


@dataclass
class _Load:
    """What one row's clients send: C clients, `blobs` per request."""

    cfg: Config
    send: Send
    rss: Callable[[], float]
    blobs: list[bytes]
    base_id: str = ""

    def _raw(self, pick: Callable[[int], str], count: int) -> tuple[list[float], int, float]:
        return run_clients(pick, self.send, requests=count, concurrency=self.cfg.concurrency,
                           images=self.blobs, timeout_s=self.cfg.row_timeout_s)

    def measure(self, pick: Callable[[int], str], count: int) -> Row:
        lat, err, wall = self._raw(pick, count)
        per = len(self.blobs)
        return _row(lat, err, wall, len(lat) * per, per, self.rss())

    def paired(self, pick: Callable[[int], str], count: int, *, warm: int = 0) -> Row:
        """The row measured in cfg.rounds chunks, each after a chunk of base requests (and `warm`
        untimed requests of the row, to reach its steady state again); the base's img/s over its
        chunks goes into extra["base_img_s"]."""
        rounds = max(1, self.cfg.rounds)
        chunk = max(self.cfg.concurrency, -(-count // rounds))
        lat: list[float] = []
        err = base_ok = base_err = 0
        wall = base_wall = 0.0
        for r in range(rounds):
            bl, be, bw = self._raw(lambda i: self.base_id, chunk)
            if warm:
                self._raw(pick, warm)
            rl, re, rw = self._raw(lambda i, at=r * chunk: pick(at + i), chunk)
            base_ok, base_err, base_wall = base_ok + len(bl), base_err + be, base_wall + bw
            lat, err, wall = lat + rl, err + re, wall + rw
        per = len(self.blobs)
        row = _row(lat, err, wall, len(lat) * per, per, self.rss())
        row.extra = {"base_img_s": base_ok * per / base_wall if base_wall else None,
                     "base_errors": base_err}
        return row


def run_mode(mode: str, cfg: Config, models: Models, send: Send, rss: Callable[[], float],
             set_budget: Callable[[int], None] | None) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    wanted = cfg.http_rows if mode == "http" else ("base", "one", "many", "zipf", "cold")
    warmed: set[str] = set()
    for per_req in cfg.http_images if mode == "http" else cfg.images:
        load = _Load(cfg, send, rss, [_png(cfg.seed + i, 224) for i in range(per_req)], models.base)
        n = max(cfg.concurrency * 2, cfg.requests // per_req)
        send(models.base, load.blobs)  # warm
        if "base" in wanted:
            rows[f"{mode}/base/x{per_req}"] = load.measure(lambda i: models.base, n)
        for d in cfg.densities:
            rows.update(_density_rows(mode, wanted, load, models, d, n, set_budget, warmed))
        zd = cfg.zipf_density or cfg.densities[0]
        if "zipf" in wanted and models.zipf and set_budget is not None:
            set_budget(int(cfg.zipf_cache_models * models.prepared_mb[zd] * MB))
            draws = zipf_picks(len(models.zipf), cfg.zipf_s, n * 3, cfg.seed + per_req)
            warm, timed = [models.zipf[j] for j in draws[:n]], [models.zipf[j] for j in draws[n:]]
            load.measure(warm.__getitem__, len(warm))  # warm-up: the cache reaches its steady state
            rows[f"{mode}/zipf/{zd:g}/x{per_req}"] = load.paired(timed.__getitem__, len(timed))
            warmed.clear()  # the small zipf cache evicted them
    return rows


def _density_rows(mode: str, wanted: Sequence[str], load: _Load, models: Models, d: float, n: int,
                  set_budget: Callable[[int], None] | None, warmed: set[str]) -> dict[str, Row]:
    """The one, many and cold rows at one density."""
    cfg, rows = load.cfg, {}
    ids, tag, per_req = models.by_density[d], f"{d:g}", len(load.blobs)
    if set_budget is not None:  # every density's `many` models fit at once
        set_budget(int((cfg.many + 10) * sum(models.prepared_mb.values()) * MB))
    for m in ids[: cfg.many]:
        if m not in warmed:  # warm every model of the row once
            load.send(m, load.blobs[:1])
            warmed.add(m)
    if "one" in wanted:
        # Steady state of one busy model: a short untimed run first, as the base row is warmed, so
        # the engine's switch of a hot model to dense adapted weights (once) is not in the timing;
        # after each base chunk, untimed requests until the model has had SOLO_STREAK batches alone.
        load.measure(lambda i: ids[0], 4 * cfg.concurrency)
        rows[f"{mode}/one/{tag}/x{per_req}"] = load.paired(lambda i: ids[0], n, warm=3 * cfg.concurrency)
    if "many" in wanted:
        rows[f"{mode}/many/{tag}/x{per_req}"] = load.paired(lambda i: ids[i % cfg.many], n)
    cold, models.cold[d] = models.cold[d][: cfg.cold_models], models.cold[d][cfg.cold_models :]
    if "cold" in wanted and cold:  # a model is cold once
        rows[f"{mode}/cold/{tag}/x{per_req}"] = _cold_row(cfg, cold, ids[0], load.send, load.blobs, load.rss)
    return rows


def _cold_row(cfg: Config, cold_ids: list[str], warm_id: str, send: Callable[[str, list[bytes]], None],
              blobs: list[bytes], rss: Callable[[], float]) -> Row:
    """C-1 clients on the warm model; one client asks each cold model once, in turn."""
    stop = threading.Event()
    warm_lat: list[float] = []
    warm_images = [0]

    def warm_client() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            send(warm_id, blobs)
            warm_lat.append(time.perf_counter() - t0)
            warm_images[0] += len(blobs)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, cfg.concurrency - 1)) as pool:
        futures = [pool.submit(warm_client) for _ in range(max(1, cfg.concurrency - 1))]
        lat, err, _ = run_clients(lambda i: cold_ids[i], send, requests=len(cold_ids), concurrency=1,
                                  images=blobs, timeout_s=cfg.row_timeout_s)
        stop.set()
        for f in futures:
            f.result()
    wall = time.perf_counter() - t0
    row = _row(lat, err, wall, warm_images[0] + len(lat) * len(blobs), len(blobs), rss())
    warm_ms = sorted(x * 1000 for x in warm_lat)
    row.extra = {"warm_p50_ms": statistics.median(warm_ms) if warm_ms else None}
    return row


# ---------------------------------------------------------------- HTTP mode


class HttpServer:
    """`sparseshot serve` on a free loopback port over the same data folder, for the run's length."""

    def __init__(self, service: Service, cfg: Config, cache_bytes: int) -> None:
        self.port = free_port()
        env = {**os.environ, **service.env, "SPARSESHOT_MODEL_CACHE_BYTES": str(cache_bytes),
               "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
        cmd = [sys.executable, "-m", "app.cli", "--log-level", "WARNING", "serve", "--no-worker",
               "--no-migrate", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {service.api_key}"}
        self._local = threading.local()
        self._wait_ready(timeout_s=300)

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sparseshot serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("sparseshot serve did not become ready")

    def client(self) -> Any:
        import httpx

        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=120)
        return c

    def send(self, model_id: str, blobs: list[bytes]) -> None:
        files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        r = self.client().post(f"/v1/models/{model_id}/classify", files=files, data={"top_k": "5"})
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")

    def import_delta(self, data: bytes, name: str) -> str:
        files = {"delta": (f"{name}.safetensors", data, "application/octet-stream")}
        r = self.client().post("/v1/models/import", files=files, data={"name": name})
        if r.status_code != 201:
            raise RuntimeError(f"import: {r.status_code}: {r.text[:200]}")
        return str(r.json()["id"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the run


def _prepared_mb(base: Any, data: bytes) -> float:
    from sparseshot.delta import SparseDelta
    from sparseshot.serving import prepare

    return prepare(base, SparseDelta.from_bytes(data)).nbytes / MB


def build_models(
    cfg: Config, service: Service, base: Any, names: list[str], log: Callable[[str], None]
) -> Models:
    zd = cfg.zipf_density or cfg.densities[0]
    by_density, cold, sizes = {}, {}, {}
    seed = cfg.seed * 100_000
    for d in cfg.densities:
        t0 = time.perf_counter()
        count = cfg.many + cfg.cold_models * len(cfg.images) + 1
        ids = []
        for i in range(count):
            data = synth_delta(base, names, d, seed)
            if i == 0:
                sizes[d] = _prepared_mb(base, data)
            ids.append(service.import_delta(data, f"d{d:g}-{i}"))
            seed += 1
        by_density[d], cold[d] = ids[: cfg.many], ids[cfg.many :]
        log(f"density {d:g}: {count} models imported in {time.perf_counter() - t0:.0f} s "
            f"(file {len(data) / MB:.1f} MB, prepared {sizes[d]:.1f} MB)")
    zipf: list[str] = list(by_density[zd][: cfg.zipf_models])
    t0 = time.perf_counter()
    while len(zipf) < cfg.zipf_models:
        zipf.append(service.import_delta(synth_delta(base, names, zd, seed), f"z{len(zipf)}"))
        seed += 1
    if cfg.zipf_models:
        log(f"zipf: {cfg.zipf_models} models ready in {time.perf_counter() - t0:.0f} s")
    return Models(service.zeroshot(), by_density, zipf, cold, sizes)


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    from sparseshot.recipe import trainable_weights

    with tempfile.TemporaryDirectory(prefix="sparseshot-serving-") as tmp:
        service = Service(cfg, Path(tmp))
        try:
            base = service.runtime.bases.get(cfg.spec)
            names = list(trainable_weights(base.model, encoder=cfg.towers))
            models = build_models(cfg, service, base, names, log)
            rows: dict[str, Row] = {}
            cold_all = {d: list(ids) for d, ids in models.cold.items()}
            if "library" in cfg.modes:
                rows.update(run_mode("library", cfg, models, service.classify, _rss_mb,
                                     service.set_cache_budget))
                log("library mode done")
        finally:
            service.close()
        if "http" in cfg.modes:
            models.cold = cold_all  # a fresh process: every one of them is cold there
            budget = int((cfg.many + 10) * sum(models.prepared_mb.values()) * MB)
            server = HttpServer(service, cfg, budget)
            try:
                data = synth_delta(base, names, cfg.densities[0], 10**9)
                server.send(server.import_delta(data, "http-import"), [_png(0, 224)])  # the endpoint works
                rss = lambda: _rss_mb(server.proc.pid)  # noqa: E731
                rows.update(run_mode("http", cfg, models, server.send, rss, None))
            finally:
                server.close()
            log("http mode done")
    return {"rows": {k: asdict(v) for k, v in rows.items()}, "ratios": _ratios(rows, cfg),
            "config": {**asdict(cfg), "spec": cfg.spec, "trained_matrices": len(names),
                       "prepared_mb": models.prepared_mb, "cpu_count": os.cpu_count(),
                       "load_average": os.getloadavg()}}


def _ratios(rows: dict[str, Row], cfg: Config) -> dict[str, float | None]:
    d, per = f"{cfg.densities[0]:g}", cfg.images[0]
    zd = f"{(cfg.zipf_density or cfg.densities[0]):g}"

    def ratio(key: str) -> float | None:
        r = rows.get(key)
        base = r.extra.get("base_img_s") if r is not None else None
        return r.img_s / base if r is not None and base else None

    return {"one_over_base": ratio(f"library/one/{d}/x{per}"),
            "many_over_base": ratio(f"library/many/{d}/x{per}"),
            "zipf_over_base": ratio(f"library/zipf/{zd}/x{per}")}


def print_table(result: dict[str, Any]) -> None:
    print("| row | img/s | ÷ base | p50 ms | p99 ms | errors | resident MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in result["rows"].items():
        extra = f" (warm p50 {r['extra']['warm_p50_ms']:.0f} ms)" if r["extra"].get("warm_p50_ms") else ""
        base = r["extra"].get("base_img_s")
        vs = f"{r['img_s'] / base:.2f}" if base else ""
        print(f"| {name}{extra} | {r['img_s']:.2f} | {vs} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
              f"| {r['errors']} | {r['resident_mb']:.0f} |")
    ratios = {k: (round(v, 3) if v is not None else None) for k, v in result["ratios"].items()}
    print("ratios:", json.dumps(ratios))


def default_budget() -> float:
    """The recipe's default SO `delta_budget`: a default-trained delta holds at most this fraction
    of each trained matrix, so the synthetic delta at this density is the default's worst case."""
    from sparseshot.configs import hparam_defaults

    return float(hparam_defaults("so")["delta_budget"])


def _densities(text: str) -> tuple[float, ...]:
    """Comma-separated fractions; `default` stands for the recipe's default delta budget."""
    return tuple(default_budget() if x.strip() == "default" else float(x) for x in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    ap.add_argument("--model", default=d.model, help="open_clip name (random init) or NAME:PRETRAINED")
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--images", default="1,8", help="images per request, comma-separated")
    ap.add_argument("--densities", default="0.005,0.02,default",
                    help="fraction of each matrix changed, comma-separated; `default`: the recipe's "
                         "default delta_budget")
    ap.add_argument("--many", type=int, default=d.many)
    ap.add_argument("--zipf-models", type=int, default=d.zipf_models)
    ap.add_argument("--zipf-cache-models", type=int, default=d.zipf_cache_models)
    ap.add_argument("--zipf-density", type=float, default=None)
    ap.add_argument("--cold-models", type=int, default=d.cold_models)
    ap.add_argument("--requests", type=int, default=d.requests, help="requests per row at 1 image each")
    ap.add_argument("--towers", default=d.towers, choices=["vision", "both"])
    ap.add_argument("--modes", default="library,http")
    ap.add_argument("--http-rows", default=",".join(d.http_rows))
    ap.add_argument("--http-images", default="1", help="images per request in HTTP mode")
    ap.add_argument("--rounds", type=int, default=d.rounds,
                    help="chunks of each one/many/zipf row, alternating with base chunks")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    cfg = Config(model=a.model, threads=a.threads, concurrency=a.concurrency,
                 images=tuple(int(x) for x in _floats(a.images)), densities=_densities(a.densities),
                 many=a.many, zipf_models=a.zipf_models, zipf_cache_models=a.zipf_cache_models,
                 zipf_density=a.zipf_density,
                 cold_models=a.cold_models, requests=a.requests, towers=a.towers,
                 modes=tuple(a.modes.split(",")), http_rows=tuple(a.http_rows.split(",")),
                 http_images=tuple(int(x) for x in _floats(a.http_images)), rounds=a.rounds)
    result = run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print_table(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
