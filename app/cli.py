"""The `sparseshot` command: serve, worker, migrate, keys, bench.

This is where the processes are assembled, so it is the one module of `app/` that imports
`worker/` (the Celery-backed queue, the worker): tests/engine/test_layers.py allows it here only.
Imports are inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.config import Settings

log = logging.getLogger("sparseshot.cli")


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
    from app.services import inference
    from worker.dispatch import CeleryQueue
    from worker.embedded import EmbeddedWorker

    settings = _settings()
    if not args.no_migrate:
        cmd_migrate(args)
    inference.warm_up()  # load the base model in the background while the server starts
    embedded = None
    if not settings.broker_url and not args.no_worker:
        embedded = EmbeddedWorker(settings.queue_name).start()
    try:
        api = create_app(settings, queue=CeleryQueue.for_settings(settings))
        uvicorn.run(api, host=args.host, port=args.port, log_level=args.log_level.lower(), workers=1)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker on the training queue (one training at a time)."""
    from worker.celery_app import make_celery
    from worker.embedded import worker_argv

    settings = _settings()
    argv = worker_argv(settings.queue_name, loglevel=args.log_level, hostname=args.hostname)
    make_celery(settings).worker_main(argv[2:])  # drop "-A worker.main": the app is given
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.errors import NotFound
    from app.services import auth

    with session_scope() as session:
        if args.keys_cmd == "create":
            row, plaintext = auth.create_key(session=session, tenant_name=args.tenant)
            print(f"created key {row.id} (prefix {row.prefix}) for tenant {args.tenant}")
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


BENCHES = {
    "train-step": "benchmarks.train_step",
    "fewshot": "benchmarks.fewshot",
    "delta-size": "benchmarks.delta_size",
}


def run_bench(argv: Sequence[str]) -> int:
    """`bench NAME ARGS...`: NAME's module main(ARGS) (its own options and --help)."""
    import importlib

    if not argv or argv[0] not in BENCHES:
        print(f"usage: sparseshot bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    rc = importlib.import_module(BENCHES[argv[0]]).main(list(argv[1:]))
    return int(rc or 0)


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

    w = sub.add_parser("worker", help="run a training worker (Celery)")
    w.add_argument("--hostname", default=None, help="Celery node name (default: unique)")
    w.set_defaults(func=cmd_worker)

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

    # Listed for --help; main() hands `bench ...` to the benchmark's own parser.
    sub.add_parser("bench", help="benchmarks: bench {train-step,fewshot,delta-size} [options]")
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
