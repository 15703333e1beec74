"""The `sparseshot` command line: migrate, keys, bench dispatch."""

from __future__ import annotations

import sys
import types

import pytest

from app import cli
from app.db import session_scope
from app.services import auth


def test_keys_create_list_revoke(env_settings, capsys):
    assert cli.main(["migrate"]) == 0  # idempotent on a migrated database
    assert cli.main(["keys", "create", "--tenant", "acme"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("sk_") and " " not in key
    with session_scope() as s:
        assert auth.authenticate(session=s, key=key).name == "acme"
        (row,) = auth.list_keys(session=s)
        key_id = row.id

    assert cli.main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "acme" in listing and key not in listing

    assert cli.main(["keys", "revoke", key_id]) == 0
    assert key_id in capsys.readouterr().out
    with session_scope() as s, pytest.raises(auth.Unauthorized):
        auth.authenticate(session=s, key=key)
    assert cli.main(["keys", "revoke", "no-such-key"]) == 1


def test_bench_passes_arguments_through(monkeypatch):
    seen: list[list[str]] = []
    fake = types.ModuleType("benchmarks.train_step")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "benchmarks.train_step", fake)
    assert cli.main(["bench", "train-step", "--steps", "3", "--help-me"]) == 0
    assert cli.main(["--log-level", "DEBUG", "bench", "train-step", "-x"]) == 0
    assert seen == [["--steps", "3", "--help-me"], ["-x"]]
    assert cli.main(["bench", "nope"]) == 2


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("serve", "worker", "migrate", "keys", "tenants", "bench"):
        assert name in out


def test_keys_create_before_migrate_and_blank_tenant_are_clear_errors(tmp_path, monkeypatch, capsys):
    from app import db
    from app.core.config import get_settings

    monkeypatch.setenv("SPARSESHOT_DATA_DIR", str(tmp_path / "fresh"))
    monkeypatch.delenv("SPARSESHOT_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    db.dispose_engines()
    try:
        assert cli.main(["keys", "create", "--tenant", "acme"]) == 1
        err = capsys.readouterr().err
        assert "sparseshot migrate" in err and "Traceback" not in err
        assert cli.main(["migrate"]) == 0
        assert cli.main(["keys", "create", "--tenant", "   "]) == 1
        assert "--tenant" in capsys.readouterr().err
        assert cli.main(["keys", "create", "--tenant", "x" * 201]) == 1
    finally:
        db.dispose_engines()
        get_settings.cache_clear()


def test_tenants_set_limits(env_settings, capsys):
    from app import quotas
    from app.models import Tenant

    assert cli.main(["keys", "create", "--tenant", "acme"]) == 0
    capsys.readouterr()
    assert cli.main(["tenants", "set-limits", "--tenant", "acme", "--max-running-jobs", "1",
                     "--max-models", "0"]) == 0
    out = capsys.readouterr().out
    assert "max_running_jobs" in out and "(tenant)" in out
    with session_scope() as s:
        tenant = s.query(Tenant).filter_by(name="acme").one()
        limits = quotas.limits_of(tenant, env_settings)
    assert limits["max_running_jobs"] == 1 and limits["max_models"] == 0
    assert limits["max_queued_jobs"] == env_settings.max_queued_jobs  # untouched: the default
    # `default` clears one override and keeps the others.
    assert cli.main(["tenants", "set-limits", "--tenant", "acme", "--max-models", "default"]) == 0
    with session_scope() as s:
        tenant = s.query(Tenant).filter_by(name="acme").one()
        assert (tenant.max_models, tenant.max_running_jobs) == (None, 1)
    assert cli.main(["tenants", "set-limits", "--tenant", "nobody", "--max-models", "3"]) == 1
    assert "no tenant" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tenants", "set-limits", "--tenant", "acme", "--max-models", "-1"])


def test_serve_without_the_worker_plugin_says_how_to_fix_it(env_settings, monkeypatch):
    monkeypatch.setattr(cli, "plugins", lambda: [])
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", "--no-migrate"])
    assert cli.PLUGIN_GROUP in str(stop.value) and "setup.sh" in str(stop.value)
    with pytest.raises(SystemExit):  # and no `worker` command
        cli.main(["worker"])
