"""The `sparseshot` command: serve, migrate, keys, tenants, bench; and, over the HTTP API through
`sparseshot.client`: datasets, train, jobs, classify, models, demo.

What `app/` does not implement comes from plugins, the `sparseshot.cli` entry points
(pyproject.toml; `PLUGIN_GROUP`, the `Plugin` protocol): the worker package's (`worker/cli.py`)
adds the `worker` command and gives `sparseshot serve` its training queue and embedded worker, so
`app/` imports nothing of `worker/` (tests/sparseshot/test_layers.py).
Imports are inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from argparse import _SubParsersAction

    from app.core.config import Settings
    from app.queue import Queue
    from sparseshot.client import Client, Job

log = logging.getLogger("sparseshot.cli")

PLUGIN_GROUP = "sparseshot.cli"  # entry points naming a Plugin object (pyproject.toml)

class Stoppable(Protocol):
    def stop(self) -> None: ...


class Plugin(Protocol):
    """What another package adds to the `sparseshot` command."""

    def add_commands(self, sub: _SubParsersAction[argparse.ArgumentParser]) -> None:
        """Add its subcommands (each with `func`, as the ones here)."""

    def queue(self, settings: Settings) -> Queue:
        """The training queue `sparseshot serve` plugs into the API's runtime."""

    def start_worker(self, settings: Settings) -> Stoppable:
        """Start the worker `sparseshot serve` runs beside the API without a broker URL."""


def plugins() -> list[Plugin]:
    """The installed `sparseshot.cli` plugins, by entry point name."""
    return [ep.load() for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)]


def _serving_plugin() -> Plugin:
    found = plugins()
    if not found:
        raise SystemExit(f"error: `sparseshot serve` needs the training queue of a `{PLUGIN_GROUP}` plugin "
                         "(the worker package's): none is installed; reinstall the project "
                         "(bash scripts/setup.sh, or pip install -e .)")
    return found[0]


def _settings() -> Settings:
    # Imported lazily so that `--help` stays fast.
    from app.core.config import get_settings

    return get_settings()


def cmd_migrate(_: argparse.Namespace) -> int:
    """alembic upgrade head on the configured database."""
    import migrations

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.database_url)
    print("database is at the latest revision")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Migrate, start the embedded worker (no broker URL), then run uvicorn until stopped."""
    import uvicorn

    from app.main import create_app
    from app.webhooks.dispatch import start_dispatcher

    plugin = _serving_plugin()
    settings = _settings()
    if not args.no_migrate:
        cmd_migrate(args)
    embedded = None
    if not settings.broker_url and not args.no_worker:
        embedded = plugin.start_worker(settings)
    # uvicorn handles SIGTERM itself, then re-raises it to the handler it found: make that one
    # unwind (SystemExit) instead of killing the process, so `finally` stops the worker.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        api = create_app(settings, queue=plugin.queue(settings))
        api.state.runtime.bases.warm_up()  # load the base model in the background while the server starts
        # Webhooks of jobs this process ends (a queued job cancelled), and any others due.
        start_dispatcher(api.state.runtime)
        uvicorn.run(api, host=args.host, port=args.port, log_level=args.log_level.lower(), workers=1)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _schema_missing() -> str | None:
    """Why the keys table cannot be used (not migrated, database unreachable), or None."""
    from sqlalchemy import inspect

    from app.db import get_engine

    try:
        if not inspect(get_engine()).has_table("api_keys"):
            return "the database has no schema yet: run `sparseshot migrate` (or `sparseshot serve`) first"
    except Exception as e:
        return f"cannot reach the database: {type(e).__name__}: {e}"
    return None


def cmd_keys(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.errors import NotFound
    from app.schemas import MAX_NAME_CHARS
    from app.services import auth

    problem = _schema_missing()
    if args.keys_cmd == "create":
        name = args.tenant.strip()
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            limit = f"1-{MAX_NAME_CHARS} printable characters"
            problem = problem or f"--tenant must be {limit}, not {args.tenant!r}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    with session_scope() as session:
        if args.keys_cmd == "create":
            row, plaintext = auth.create_key(session=session, tenant_name=args.tenant)
            print(f"created key {row.id} (prefix {row.prefix}) for tenant {args.tenant.strip()}")
            print("the key is shown only once:")
            print(plaintext)
        elif args.keys_cmd == "list":
            rows = auth.list_keys(session=session, tenant_name=args.tenant)
            print(f"{'KEY_ID':36}  {'PREFIX':12}  {'TENANT':20}  {'CREATED':25}  REVOKED")
            for r in rows:
                revoked = r.revoked_at.isoformat() if r.revoked_at else "-"
                created = r.created_at.isoformat()
                print(f"{r.id:36}  {r.prefix:12}  {r.tenant.name:20}  {created:25}  {revoked}")
        else:
            try:
                row = auth.revoke_key(session=session, key_id=args.key_id)
            except NotFound as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"revoked key {row.id}")
    return 0


def _limit_value(text: str) -> int | None:
    # `--max-... N` sets the tenant's own value; `default` clears it (back to the setting).
    if text.strip().lower() == "default":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a limit is >= 0 or 'default', not {text}")
    return value


def cmd_tenants(args: argparse.Namespace) -> int:
    """`tenants set-limits`: set or clear a tenant's own limits, then print the effective ones."""
    from app import quotas
    from app.db import session_scope

    values = {name: getattr(args, name) for name in quotas.LIMITS if hasattr(args, name)}
    settings = _settings()
    with session_scope() as session:
        try:
            tenant = quotas.set_limits(session=session, tenant_name=args.tenant, values=values)
        except LookupError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 1
        effective = quotas.limits_of(tenant, settings)
        for name in quotas.LIMITS:
            own = getattr(tenant, name)
            print(f"{name:24} {effective[name]:>10}  {'(tenant)' if own is not None else '(default)'}")
    return 0


BENCHES = {
    "train-step": "benchmarks.train_step",
    "fewshot": "benchmarks.fewshot",
    "delta-size": "benchmarks.delta_size",
    "serving": "benchmarks.serving",
    "job-step": "benchmarks.job_step",
    "load": "benchmarks.load",
}


def run_bench(argv: Sequence[str]) -> int:
    """`bench NAME ARGS...`: NAME's module main(ARGS) (its own options and --help)."""
    import importlib

    if not argv or argv[0] not in BENCHES:
        print(f"usage: sparseshot bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    rc = importlib.import_module(BENCHES[argv[0]]).main(list(argv[1:]))
    return int(rc or 0)


# ---------------------------------------------------------------- client commands (HTTP API)


def _client(args: argparse.Namespace) -> Client:
    from sparseshot.client import Client

    return Client(args.url, args.key)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table_lines(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    """Rows as left-aligned columns under `header` (None shown as "-")."""
    cells = [list(map(str, header))] + [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    for line in _table_lines(rows, header):
        print(line)


def cmd_datasets(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.datasets_cmd == "create":
        ds = c.create_dataset(args.name, [x.strip() for x in args.classes.split(",") if x.strip()])
        print(f"created dataset {ds['name']!r} with classes {', '.join(ds['classes'])}")
        print(ds["id"])
    elif args.datasets_cmd == "upload":
        added = rejected = 0
        for source in args.sources:
            out = c.upload(args.dataset, source, label=args.label)
            added += len(out["added"])
            rejected += len(out["rejected"])
            for r in out["rejected"]:
                print(f"rejected {r['filename']}: {r['detail']}", file=sys.stderr)
        print(f"added {added} image(s), rejected {rejected}")
    elif args.datasets_cmd == "list":
        _table([(d["id"], d["name"], sum(d["image_counts"].values()), ", ".join(d["classes"]))
                for d in c.list_datasets()], ["ID", "NAME", "IMAGES", "CLASSES"])
    else:
        _print_json(c.get_dataset(args.dataset))
    return 0


def _wait(job: Job, timeout: float | None) -> int:
    from sparseshot.client import JobFailed

    try:
        job.wait(progress=True, timeout=timeout)
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"job {job.id} succeeded: model {job.model_id}")
    print(job.model_id)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    c = _client(args)
    params = json.loads(args.params) if args.params else {}
    validation = {"holdout": args.holdout} if args.holdout is not None else None
    job = c.train(args.dataset, method=args.method, preset=args.preset, params=params,
                  base_model=args.base_model, validation=validation)
    est = job.data.get("estimated_seconds")
    print(f"job {job.id} {job.status} (preset {job.data.get('preset')}, "
          f"estimated {'unknown' if est is None else f'{est:.0f} s'})", file=sys.stderr)
    if args.wait:
        return _wait(job, args.timeout)
    print(job.id)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.jobs_cmd == "list":
        rows = [(j.id, j.status, j.data["method"], j.data.get("preset"), j.progress.get("step"),
                 j.progress.get("total_steps"), j.model_id) for j in c.list_jobs(status=args.status)]
        _table(rows, ["ID", "STATUS", "METHOD", "PRESET", "STEP", "TOTAL", "MODEL"])
    elif args.jobs_cmd == "show":
        _print_json(c.get_job(args.job).data)
    elif args.jobs_cmd == "wait":
        return _wait(c.get_job(args.job), args.timeout)
    else:
        job = c.cancel(args.job)
        print(f"job {job.id}: {job.status}{' (cancel requested)' if job.data['cancel_requested'] else ''}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from sparseshot.client import expand_images

    c = _client(args)
    threshold = json.loads(args.threshold) if args.threshold else None  # a number or {class: number}
    preds = c.classify(args.model, expand_images(args.images), top_k=args.top_k, threshold=threshold)
    if args.json:
        _print_json(preds)
        return 0
    for p in preds:
        labels = "  ".join(f"{lab['label']} {lab['score']:.3f}" for lab in p["labels"])
        print(f"{p['filename']}: {labels or 'unknown'}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.models_cmd == "list":
        _table([(m["id"], m["method"], m["status"], m["delta"]["nnz"], ", ".join(m["classes"]))
                for m in c.list_models()], ["ID", "METHOD", "STATUS", "NNZ", "CLASSES"])
    elif args.models_cmd == "show":
        _print_json(c.get_model(args.model))
    elif args.models_cmd == "evaluate":
        ev = c.evaluate(args.model, args.dataset)
        if args.json:
            _print_json(ev)
        else:
            print(evaluation_report(ev))
    else:
        path = c.export(args.model, args.format, args.output)
        print(f"saved the {args.format} export of model {args.model} to {path}", file=sys.stderr)
        print(path)
    return 0


def evaluation_report(ev: dict[str, Any]) -> str:
    """An evaluation as text: accuracy, a per-class table, the confusion matrix, exclusions."""
    classes = ev["classes"]
    lines = [f"evaluation {ev['id']} of model {ev['model_id']} on dataset {ev['dataset_id']}",
             f"accuracy {ev['accuracy']:.3f} on {ev['n_images']} image(s)", ""]
    pc, th = ev["per_class"], ev["suggested_thresholds"]
    rows = [(c, f"{pc[c]['precision']:.3f}", f"{pc[c]['recall']:.3f}", f"{pc[c]['f1']:.3f}", pc[c]["support"],
             "-" if th.get(c) is None else f"{th[c]:.3f}") for c in classes]
    lines += _table_lines(rows, ["CLASS", "PRECISION", "RECALL", "F1", "SUPPORT", "THRESHOLD"])
    lines += ["", "confusion matrix (rows: true, columns: predicted):"]
    lines += _table_lines([(c, *row) for c, row in zip(classes, ev["confusion_matrix"], strict=True)],
                          ["", *classes])
    if ev["excluded_images"]:
        parts = ", ".join(f"{label} ({n})" for label, n in ev["excluded_labels"].items())
        lines += ["", f"{ev['excluded_images']} image(s) not evaluated, labels not among the model's "
                      f"classes: {parts}"]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole flow on the bundled sample dataset: dataset, upload, train, wait, classify."""
    import tempfile
    from pathlib import Path

    from sparseshot import sample_data

    c = _client(args)
    with tempfile.TemporaryDirectory(prefix="sparseshot-demo-") as tmp:
        root = sample_data.generate(Path(tmp), per_class=args.per_class, queries=2)
        classes = list(sample_data.CLASSES)
        ds = c.create_dataset("sparseshot demo", classes)
        print(f"1. dataset {ds['id']} with classes {', '.join(classes)}")
        up = c.upload(ds, root / "train")
        print(f"2. uploaded {len(up['added'])} generated images ({len(up['rejected'])} rejected)")
        params = json.loads(args.params) if args.params else {}
        job = c.train(ds, preset=args.preset, params=params)
        est = job.data.get("estimated_seconds")
        print(f"3. job {job.id} (preset {args.preset}, estimated "
              f"{'unknown' if est is None else f'{est:.0f} s'})")
        rc = _wait(job, args.timeout)
        if rc:
            return rc
        queries = sorted((root / "query").glob("*.png"))
        preds = c.classify(job.model_id, queries, top_k=1)
        right = 0
        print("4. classify held-out images:")
        for q, p in zip(queries, preds, strict=True):
            truth, top = q.stem.rsplit("_q", 1)[0].replace("_", " "), p["labels"][0]
            right += truth == top["label"]
            print(f"   {q.name}: {top['label']} ({top['score']:.2f})")
        print(f"   {right}/{len(queries)} correct; history: {len(c.history(job))} points")
    return 0


Command = Callable[[argparse.Namespace], int]


def _guarded(func: Command) -> Command:
    """A client command whose API, connection and input errors print one line and exit 1."""

    def run(args: argparse.Namespace) -> int:
        import httpx

        from sparseshot.client import ApiError

        try:
            return int(func(args) or 0)
        except ApiError as e:
            print(f"error: {e}", file=sys.stderr)
        except httpx.TransportError as e:
            print(f"error: cannot reach {args.url or 'the API'}: {e}", file=sys.stderr)
        except (TimeoutError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
        return 1

    return run


def _add_client_commands(sub: _SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", default=None, help="API URL (default $SPARSESHOT_URL or http://127.0.0.1:8000)")
    conn.add_argument("--key", default=None, help="API key (default $SPARSESHOT_API_KEY)")

    d = sub.add_parser("datasets", help="datasets over the HTTP API")
    ds = d.add_subparsers(dest="datasets_cmd", required=True)
    dc = ds.add_parser("create", parents=[conn], help="create a dataset (its id on the last line)")
    dc.add_argument("name")
    dc.add_argument("--classes", required=True, help="comma-separated class names")
    du = ds.add_parser("upload", parents=[conn], help="upload a class-folder tree, a .zip, or files")
    du.add_argument("dataset")
    du.add_argument("sources", nargs="+", help="folder (one subfolder per class), .zip, or images")
    du.add_argument("--label", default=None, help="class of the given files / folder")
    ds.add_parser("list", parents=[conn], help="list datasets")
    dsh = ds.add_parser("show", parents=[conn], help="one dataset as JSON")
    dsh.add_argument("dataset")
    d.set_defaults(func=_guarded(cmd_datasets))

    t = sub.add_parser("train", parents=[conn], help="start a training job (--wait: progress bar)")
    t.add_argument("dataset")
    t.add_argument("--method", default="so", choices=["so", "lora"])
    t.add_argument("--preset", default="standard", choices=["quick", "standard", "thorough"])
    t.add_argument("--params", default=None, help='JSON hyperparameters over the preset: \'{"lr": 1e-3}\'')
    t.add_argument("--base-model", default=None)
    t.add_argument("--holdout", type=float, default=None,
                   help="fraction of each class held out for validation accuracy (classes keep 2)")
    t.add_argument("--wait", action="store_true", help="wait with a progress bar; the model id last")
    t.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    t.set_defaults(func=_guarded(cmd_train))

    j = sub.add_parser("jobs", help="training jobs over the HTTP API")
    js = j.add_subparsers(dest="jobs_cmd", required=True)
    jl = js.add_parser("list", parents=[conn], help="list jobs")
    jl.add_argument("--status", default=None)
    for name, text in (("show", "one job as JSON"), ("cancel", "cancel a job"), ("wait", "wait for a job")):
        jx = js.add_parser(name, parents=[conn], help=text)
        jx.add_argument("job")
        if name == "wait":
            jx.add_argument("--timeout", type=float, default=None)
    j.set_defaults(func=_guarded(cmd_jobs))

    c = sub.add_parser("classify", parents=[conn], help="classify images with a model")
    c.add_argument("model")
    c.add_argument("images", nargs="+", help="image files or folders")
    c.add_argument("--top-k", type=int, default=3)
    c.add_argument("--threshold", default=None,
                   help='drop labels under it: a probability (0.5) or JSON {"class": 0.7, ...}')
    c.add_argument("--json", action="store_true", help="print the predictions as JSON")
    c.set_defaults(func=_guarded(cmd_classify))

    mo = sub.add_parser("models", help="models over the HTTP API")
    ms = mo.add_subparsers(dest="models_cmd", required=True)
    ms.add_parser("list", parents=[conn], help="list models")
    msh = ms.add_parser("show", parents=[conn], help="one model as JSON")
    msh.add_argument("model")
    me = ms.add_parser("export", parents=[conn], help="download the model: its sparse delta, a merged "
                       "open_clip checkpoint or an ONNX classifier")
    me.add_argument("model")
    me.add_argument("--format", choices=["delta", "checkpoint", "onnx"], default="delta",
                    help="delta: <id>.safetensors (default); checkpoint: <id>-merged.safetensors; "
                         "onnx: <id>.onnx")
    me.add_argument("-o", "--output", default=None, help="file or folder (default: ./ with the name above)")
    mev = ms.add_parser("evaluate", parents=[conn], help="evaluate on a labelled dataset; print a report")
    mev.add_argument("model")
    mev.add_argument("dataset")
    mev.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    mo.set_defaults(func=_guarded(cmd_models))

    de = sub.add_parser("demo", parents=[conn], help="the whole flow on a generated sample dataset")
    de.add_argument("--preset", default="quick", choices=["quick", "standard", "thorough"])
    de.add_argument("--params", default=None, help="JSON hyperparameters over the preset")
    de.add_argument("--per-class", type=int, default=6, help="training images per class")
    de.add_argument("--timeout", type=float, default=None)
    de.set_defaults(func=_guarded(cmd_demo))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseshot", description="Few-shot CLIP adaptation service.")
    p.add_argument("--log-level", default=os.environ.get("SPARSESHOT_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the HTTP API (and an embedded worker without a broker URL)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    s.add_argument("--no-migrate", action="store_true", help="skip `migrate` (a prestart step ran it)")
    s.set_defaults(func=cmd_serve)

    for plugin in plugins():  # the worker package's: `worker`
        plugin.add_commands(sub)

    m = sub.add_parser("migrate", help="bring the database schema up to date")
    m.set_defaults(func=cmd_migrate)

    k = sub.add_parser("keys", help="manage API keys")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="create a key (printed alone on the last line)")
    kc.add_argument("--tenant", required=True)
    kl = ks.add_parser("list", help="list keys")
    kl.add_argument("--tenant", default=None)
    kr = ks.add_parser("revoke", help="revoke a key by id or prefix")
    kr.add_argument("key_id")
    k.set_defaults(func=cmd_keys)

    t = sub.add_parser("tenants", help="per-tenant limits")
    ts = t.add_subparsers(dest="tenants_cmd", required=True)
    tl = ts.add_parser("set-limits", help="set (N) or clear ('default') a tenant's own limits; "
                       "prints the effective limits")
    tl.add_argument("--tenant", required=True)
    for name in ("max_running_jobs", "max_queued_jobs", "max_steps_per_job", "max_images_per_dataset",
                 "max_models"):  # app.quotas.LIMITS (not imported here: --help stays fast)
        tl.add_argument("--" + name.replace("_", "-"), dest=name, type=_limit_value,
                        default=argparse.SUPPRESS, metavar="N|default")
    t.set_defaults(func=cmd_tenants)

    # Listed for --help; main() hands `bench ...` to the benchmark's own parser.
    names = ",".join(BENCHES)
    sub.add_parser("bench", help=f"benchmarks: bench {{{names}}} [options]")
    _add_client_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = 2 if argv[:1] == ["--log-level"] else 1 if argv[:1] and argv[0].startswith("--log-level=") else 0
    if argv[head : head + 1] == ["bench"]:
        return run_bench(argv[head + 1 :])
    args = build_parser().parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=fmt)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
