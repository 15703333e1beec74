"""Python client of the SparseShot HTTP API (httpx only).

    from sparseshot.client import Client
    c = Client("http://127.0.0.1:8000", "sk_...")        # or SPARSESHOT_URL / SPARSESHOT_API_KEY
    ds = c.create_dataset("pets", ["cat", "dog"])
    c.upload(ds, "photos/")                               # one subfolder per class, a .zip, or files
    job = c.train(ds, preset="quick").wait(progress=True) # text progress bar on stderr
    print(c.classify(job.model_id, ["query.jpg"], top_k=2))

Errors answered as RFC 7807 problem+json are raised as `ApiError` subclasses (`Unauthorized`,
`NotFound`, `Conflict`, `InvalidInput`, `TooLarge`, `QuotaExceeded`, `ServiceUnavailable`) carrying
status, title, detail, the whole body and `retry_after` (seconds, from a `Retry-After` header).
Resources may be passed as ids or as the dicts / `Job`s returned.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from sparseshot.io import atomic_write

__all__ = [
    "ApiError", "Client", "Conflict", "InvalidInput", "Job", "JobFailed", "NotFound", "QuotaExceeded",
    "ServiceUnavailable", "TooLarge", "Unauthorized",
]

DEFAULT_URL = "http://127.0.0.1:8000"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
TERMINAL = ("succeeded", "failed", "cancelled")
UPLOAD_BATCH = 16  # files per request; halved when the server answers 413 (its limit is lower)
# Download names of `Client.export` formats: <model id><suffix> (as the server names them).
EXPORT_SUFFIXES = {"delta": ".safetensors", "checkpoint": "-merged.safetensors", "onnx": ".onnx"}

Resource = str | Mapping[str, Any] | Any  # an id, a response dict with "id", or an object with .id
FileLike = str | os.PathLike[str] | tuple[str, bytes]


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answer of the API (problem+json when the server sent one)."""

    def __init__(self, status: int, title: str, detail: str, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail, self.body = status, title, detail, body
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if it did


class Unauthorized(ApiError):
    """401: missing, unknown or revoked API key."""


class NotFound(ApiError):
    """404: unknown id, or another tenant's."""


class Conflict(ApiError):
    """409: model not ready, dataset busy, job already finished."""


class InvalidInput(ApiError):
    """422 (and other 4xx): the request was refused as sent."""


class TooLarge(InvalidInput):
    """413: too many files or too large an upload."""


class QuotaExceeded(ApiError):
    """429: a per-tenant limit is reached. `limit` (its name, e.g. "max_queued_jobs"), `value` (the
    tenant's limit) and `current` (the usage counted against it) come from the problem body."""

    def __init__(self, status: int, title: str, detail: str, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, title, detail, body, retry_after)
        fields = body if isinstance(body, dict) else {}
        self.limit: str | None = fields.get("limit")
        self.value: int | None = fields.get("value")
        self.current: int | None = fields.get("current")


class ServiceUnavailable(ApiError):
    """503: base model, database, queue or another dependency unavailable (see `retry_after`)."""


class JobFailed(Exception):
    """`Job.wait(check=True)` on a job that ended failed or cancelled."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} {job.status}: {job.data.get('error') or ''}".rstrip(": "))
        self.job = job


_ERRORS: dict[int, type[ApiError]] = {401: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge,
                                      422: InvalidInput, 429: QuotaExceeded, 503: ServiceUnavailable}


def raise_for_problem(r: httpx.Response) -> None:
    """Raise the ApiError subclass of an error answer (no-op on 2xx)."""
    if r.is_success:
        return
    try:
        body = r.json()
    except ValueError:
        body = None
    title = body.get("title", r.reason_phrase) if isinstance(body, dict) else r.reason_phrase
    detail = body.get("detail", r.text[:500]) if isinstance(body, dict) else r.text[:500]
    cls = _ERRORS.get(r.status_code) or (InvalidInput if r.status_code < 500 else ApiError)
    raise cls(r.status_code, str(title), str(detail), body, _retry_after(r.headers.get("retry-after")))


def _retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header: a number, or an HTTP date (seconds from now, at least 0)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _id(x: Resource) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping):
        return str(x["id"])
    return str(x.id)


# ---------------------------------------------------------------- jobs


def _duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(job: Mapping[str, Any], width: int = 24) -> str:
    """`[#####.....]  120/800  loss 0.532  acc 0.41  ETA 1m20s  running` for a job's JSON."""
    p = job.get("progress") or {}
    step, total = int(p.get("step") or 0), p.get("total_steps")
    frac = min(1.0, step / total) if total else 0.0
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    loss = f"{p['loss']:.3f}" if p.get("loss") is not None else "-"
    acc = f"{p['train_accuracy']:.2f}" if p.get("train_accuracy") is not None else "-"
    eta = p.get("eta_seconds") if job.get("status") == "running" else job.get("estimated_seconds")
    return (f"[{bar}] {step:>6}/{total if total is not None else '?':<6} loss {loss}  acc {acc}  "
            f"ETA {_duration(eta)}  {job.get('status')}")


class Job:
    """A training job; `data` is its latest JSON (GET /v1/jobs/{id})."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client, self.data = client, data

    id = property(lambda self: str(self.data["id"]))
    status = property(lambda self: str(self.data["status"]))
    model_id = property(lambda self: self.data.get("model_id"))
    progress = property(lambda self: dict(self.data.get("progress") or {}))
    done = property(lambda self: self.status in TERMINAL)

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.status!r})"

    def refresh(self) -> Job:
        self.data = self.client._json("GET", f"/v1/jobs/{self.id}")
        return self

    def cancel(self) -> Job:
        return self.client.cancel(self)

    def history(self) -> list[dict[str, Any]]:
        return self.client.history(self)

    def wait(self, progress: bool = False, timeout: float | None = None, poll: float = 1.0,
             check: bool = True, stream: IO[str] | None = None) -> Job:
        """Poll until the job ends; a progress bar on `stream` (stderr) when `progress`.

        Raises TimeoutError after `timeout` seconds and, with `check`, JobFailed when the job
        ended failed or cancelled.
        """
        out = stream or sys.stderr
        tty = bool(getattr(out, "isatty", lambda: False)())
        deadline = None if timeout is None else time.monotonic() + timeout
        last_line, last_print = "", 0.0
        while True:
            self.refresh()
            line = progress_line(self.data)
            now = time.monotonic()
            if progress and line != last_line and (tty or self.done or now - last_print >= 5):
                out.write(("\r" + line + "\x1b[K") if tty else line + "\n")
                out.flush()
                last_line, last_print = line, now
            if self.done:
                break
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"job {self.id} still {self.status} after {timeout} s")
            time.sleep(poll)
        if progress and tty:
            out.write("\n")
        if check and self.status != "succeeded":
            raise JobFailed(self)
        return self


# ---------------------------------------------------------------- the client


class Client:
    """Synchronous client. `url` / `key` default to SPARSESHOT_URL / SPARSESHOT_API_KEY.

    `http` may be any httpx.Client (e.g. FastAPI's TestClient) used instead of a new one.
    """

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 120.0,
                 http: httpx.Client | None = None) -> None:
        self.url = (url or os.environ.get("SPARSESHOT_URL") or DEFAULT_URL).rstrip("/")
        self.key = key if key is not None else os.environ.get("SPARSESHOT_API_KEY")
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout)
        if self.key:
            self.http.headers["Authorization"] = f"Bearer {self.key}"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self.http.request(method, path, **kw)
        raise_for_problem(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        return r.json() if r.content else None

    # ---- datasets

    def create_dataset(self, name: str, classes: Sequence[str]) -> dict[str, Any]:
        return self._json("POST", "/v1/datasets", json={"name": name, "classes": list(classes)})

    def list_datasets(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets", params={"limit": limit, "offset": offset})

    def get_dataset(self, dataset: Resource) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{_id(dataset)}")

    def delete_dataset(self, dataset: Resource) -> None:
        self._request("DELETE", f"/v1/datasets/{_id(dataset)}")

    def upload(self, dataset: Resource, source: str | os.PathLike[str] | Sequence[FileLike]
               | Mapping[str, Sequence[FileLike]], label: str | None = None,
               batch_size: int = UPLOAD_BATCH) -> dict[str, list[dict[str, Any]]]:
        """Add images: a folder (one subfolder per class), a .zip (same layout), files of one
        `label`, or {label: files}. Sent in batches of at most `batch_size` files; merged answer."""
        groups = _upload_groups(source, label)
        out: dict[str, list[dict[str, Any]]] = {"added": [], "rejected": []}
        for lab, files in groups:
            if lab is None:  # an archive: one request
                part = self._upload_request(dataset, None, files)
                out["added"] += part["added"]
                out["rejected"] += part["rejected"]
                continue
            start, size = 0, max(1, batch_size)
            while start < len(files):
                try:
                    part = self._upload_request(dataset, lab, files[start:start + size])
                except TooLarge:
                    if size == 1:
                        raise
                    size = max(1, size // 2)  # the server takes fewer files per request
                    continue
                except InvalidInput as e:  # nothing of this batch could be added
                    part = {"added": [], "rejected": list((e.body or {}).get("rejected") or [])}
                    if not part["rejected"]:
                        raise
                out["added"] += part["added"]
                out["rejected"] += part["rejected"]
                start += size
        return out

    def _upload_request(self, dataset: Resource, label: str | None, files: Sequence[FileLike]) -> Any:
        parts = [_file_part(f) for f in files]
        if label is None:
            return self._json("POST", f"/v1/datasets/{_id(dataset)}/images",
                              files=[("archive", (n, b, "application/zip")) for n, b in parts])
        return self._json("POST", f"/v1/datasets/{_id(dataset)}/images", data={"label": label},
                          files=[("files", (n, b, "application/octet-stream")) for n, b in parts])

    # ---- jobs

    def train(self, dataset: Resource, method: str = "so", preset: str | None = None,
              params: Mapping[str, Any] | None = None, base_model: str | None = None,
              validation: Mapping[str, Any] | None = None, webhook_url: str | None = None) -> Job:
        """Start a job; `validation` holds images out, e.g. {"holdout": 0.2}, or cross-validates,
        {"kfold": 3} (see the API docs; the model's metrics["validation"] holds the report);
        `webhook_url` is POSTed to when the job ends."""
        body: dict[str, Any] = {"dataset_id": _id(dataset), "method": method, "params": dict(params or {})}
        if validation is not None:
            body["validation"] = dict(validation)
        if preset is not None:
            body["preset"] = preset
        if base_model is not None:
            body["base_model"] = base_model
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        return Job(self, self._json("POST", "/v1/jobs", json=body))

    def deliveries(self, job: Resource) -> list[dict[str, Any]]:
        """The job's webhook deliveries with their attempt log."""
        return list(self._json("GET", f"/v1/jobs/{_id(job)}/deliveries"))

    def webhook_secret(self, rotate: bool = False) -> str:
        """The tenant's webhook signing secret; `rotate=True` replaces it first."""
        return str(self._json("POST" if rotate else "GET", "/v1/webhook-secret")["secret"])

    def get_job(self, job: Resource) -> Job:
        return Job(self, self._json("GET", f"/v1/jobs/{_id(job)}"))

    def list_jobs(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return [Job(self, j) for j in self._json("GET", "/v1/jobs", params=params)]

    def cancel(self, job: Resource) -> Job:
        return Job(self, self._json("POST", f"/v1/jobs/{_id(job)}/cancel"))

    def history(self, job: Resource) -> list[dict[str, Any]]:
        return list(self._json("GET", f"/v1/jobs/{_id(job)}/history")["items"])

    def events(self, job: Resource) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, job JSON) from the job's server-sent events, until the final `end`."""
        with self.http.stream("GET", f"/v1/jobs/{_id(job)}/events", timeout=None) as r:
            if not r.is_success:
                r.read()
                raise_for_problem(r)
            name = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name:
                    yield name, json.loads(line[6:])
                    if name == "end":
                        return

    # ---- models

    def list_models(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models", params={"limit": limit, "offset": offset})

    def get_model(self, model: Resource) -> dict[str, Any]:
        return self._json("GET", f"/v1/models/{_id(model)}")

    def delete_model(self, model: Resource) -> None:
        self._request("DELETE", f"/v1/models/{_id(model)}")

    def zeroshot(self, classes: Sequence[str], template: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"classes": list(classes)}
        if template is not None:
            body["template"] = template
        return self._json("POST", "/v1/models/zeroshot", json=body)

    def classify(self, model: Resource, images: Sequence[FileLike], top_k: int = 5,
                 batch_size: int = UPLOAD_BATCH,
                 threshold: float | Mapping[str, float | None] | None = None) -> list[dict[str, Any]]:
        """Predictions [{"filename", "labels": [{"label", "score"}], "unknown"}] in the order of
        `images`. `threshold` (a probability, or one per class such as an evaluation's
        "suggested_thresholds") drops the labels under it; "unknown" is true when none is left."""
        data = {"top_k": str(top_k)}
        if threshold is not None:
            cut = dict(threshold) if isinstance(threshold, Mapping) else float(threshold)
            data["threshold"] = json.dumps(cut)
        out: list[dict[str, Any]] = []
        for start in range(0, len(images), max(1, batch_size)):
            parts = [_file_part(f) for f in images[start:start + batch_size]]
            body = self._json("POST", f"/v1/models/{_id(model)}/classify", data=data,
                              files=[("files", (n, b, "application/octet-stream")) for n, b in parts])
            out += body["predictions"]
        return out

    def evaluate(self, model: Resource, dataset: Resource) -> dict[str, Any]:
        """Evaluate the model on a labelled dataset (POST /v1/models/{id}/evaluations): the stored
        evaluation {"accuracy", "per_class", "confusion_matrix", "suggested_thresholds", ...}."""
        return self._json("POST", f"/v1/models/{_id(model)}/evaluations", json={"dataset_id": _id(dataset)})

    def list_evaluations(self, model: Resource, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """The model's stored evaluations, newest first."""
        return self._json("GET", f"/v1/models/{_id(model)}/evaluations",
                          params={"limit": limit, "offset": offset})

    def download_delta(self, model: Resource, path: str | os.PathLike[str] | None = None) -> Path:
        """Save the model's delta (safetensors); `path` may be a folder. Written atomically."""
        model_id = _id(model)
        return self._download(f"/v1/models/{model_id}/delta", path, f"{model_id}.safetensors")

    def export(self, model: Resource, format: str,
               path: str | os.PathLike[str] | None = None) -> Path:
        """Save an export of the model; `path` may be a folder (default: the current one). Formats:
        ``delta`` (<id>.safetensors), ``checkpoint`` (merged open_clip checkpoint,
        <id>-merged.safetensors; `sparseshot.export.checkpoint_classifier` loads it) and ``onnx``
        (<id>.onnx: pixels (N,3,S,S) -> probabilities (N,C)). Written atomically."""
        if format not in EXPORT_SUFFIXES:
            raise ValueError(f"unknown export format {format!r}; one of {', '.join(EXPORT_SUFFIXES)}")
        model_id = _id(model)
        return self._download(f"/v1/models/{model_id}/export", path, model_id + EXPORT_SUFFIXES[format],
                              params={"format": format}, timeout=max(self.http.timeout.read or 0, 600.0))

    def _download(self, url: str, path: str | os.PathLike[str] | None, default_name: str,
                  **kw: Any) -> Path:
        """Stream GET `url` into `path` (a file, a folder, or None: ./default_name) atomically."""
        target = Path(path) if path is not None else Path(default_name)
        if target.is_dir():
            target = target / default_name
        with self.http.stream("GET", url, **kw) as r:
            if not r.is_success:
                r.read()
                raise_for_problem(r)

            def write(fh: IO[bytes]) -> None:
                for chunk in r.iter_bytes():
                    fh.write(chunk)

            atomic_write(target, write)
        return target

    def import_delta(self, path: str | os.PathLike[str], name: str | None = None) -> dict[str, Any]:
        """Upload a delta file as a new model (POST /v1/models/import, multipart `delta` + `name`)."""
        data = {"name": name} if name is not None else {}
        p = Path(path)
        return self._json("POST", "/v1/models/import", data=data,
                          files={"delta": (p.name, p.read_bytes(), "application/octet-stream")})


# ---------------------------------------------------------------- upload helpers


def _file_part(f: FileLike) -> tuple[str, bytes]:
    if isinstance(f, tuple):
        return str(f[0]), bytes(f[1])
    p = Path(f)
    return p.name, p.read_bytes()


def _images_in(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _upload_groups(source: Any, label: str | None) -> list[tuple[str | None, list[FileLike]]]:
    """(label, files) groups; label None = one zip archive."""
    if isinstance(source, Mapping):
        return [(str(k), list(v)) for k, v in source.items()]
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_file() and zipfile.is_zipfile(p):
            return [(None, [p])]
        if p.is_dir():
            if label is not None:
                return [(label, list(_images_in(p)))]
            subdirs = [d for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")]
            if not subdirs:
                raise ValueError(f"{p} has no class subfolders (or pass label=)")
            return [(d.name, list(_images_in(d))) for d in subdirs]
        if p.is_file():
            source = [p]
        else:
            raise FileNotFoundError(p)
    files = list(source)
    if label is None:
        raise ValueError("label= is needed for a list of files")
    return [(label, files)]


def expand_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, folders expanded to the images in them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += _images_in(p) if p.is_dir() else [p]
    return out
