"""The client side over real HTTP: scripts/walkthrough.sh, `sparseshot demo` and sparseshot.client
against `sparseshot serve` (embedded defaults, tiny random base, real worker) on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.procs import Proc, free_port
from sparseshot.client import Client
from tests.e2e.test_service_e2e import Api, _create_key, _env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FAST = '{"n_iters": 3, "batch_size": 6}'  # 6 images per class -> 18 steps, seconds on the tiny base


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("client-e2e")
    # Every progress report written (not one per 0.2 s), so a few-second job has a real history.
    env = _env(tmp / "data", SPARSESHOT_HISTORY_EVERY_STEPS="2", SPARSESHOT_PROGRESS_INTERVAL_S="0.001")
    port = free_port()
    proc = Proc(["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp / "serve.log")
    try:
        api = Api(port, proc)
        api.wait_up()
        yield api, {**env, "SPARSESHOT_PORT": str(port)}
    finally:
        proc.stop()


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}: rc {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_walkthrough_script_runs_to_the_end(server, tmp_path: Path) -> None:
    api, env = server
    env = {**env, "SPARSESHOT_CLI": f"{sys.executable} -m app.cli", "PYTHON": sys.executable,
           "PARAMS": FAST, "POLL_S": "0.5", "TIMEOUT_S": "180", "WORKDIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    out = _run(["bash", str(ROOT / "scripts" / "walkthrough.sh")], env)
    assert "walk-through done" in out and "succeeded" in out, out
    assert "zip: 16 added, 2 rejected" in out
    model = next(line.split()[1] for line in out.splitlines() if line.startswith("model "))
    assert (tmp_path / f"{model}.safetensors").stat().st_size > 0
    assert "red_circle_q0.png ->" in out and "history: " in out


def test_demo_command(server) -> None:
    api, env = server
    key = _create_key(env)
    out = _run([sys.executable, "-m", "app.cli", "demo", "--url", api.base, "--key", key,
                "--params", FAST, "--timeout", "180"], {**env, "PYTHONPATH": str(ROOT)})
    assert "4. classify held-out images:" in out and "correct; history:" in out, out


def test_client_train_history_events_and_delta(server, tmp_path: Path) -> None:
    from sparseshot import sample_data

    api, env = server
    with Client(api.base, _create_key(env)) as c:
        root = sample_data.generate(tmp_path / "s", per_class=6, queries=1)
        ds = c.create_dataset("shapes", list(sample_data.CLASSES))
        assert len(c.upload(ds, root / "train")["added"]) == 18
        # Long enough (a few seconds) for several progress reports: the library reports every 0.5 s.
        job = c.train(ds, preset="quick", params={"n_iters": 40, "batch_size": 6})
        assert job.data["estimated_seconds"] > 0  # tiny base, SO, CPU: a measured figure
        events = list(c.events(job))
        assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded", events[-1]
        job.refresh()
        assert job.data["device"] == "cpu"
        assert set(job.data["versions"]) >= {"torch", "open_clip", "sparseshot", "python"}
        points = c.history(job)
        steps = [p["step"] for p in points]
        assert steps == sorted(steps) and steps[-1] == job.data["progress"]["step"] >= 240, points
        assert len(steps) >= 2, points
        assert all(p["loss"] is not None and p["lr"] is not None and p["elapsed_s"] >= 0 for p in points)
        assert points[0]["lr"] > points[-1]["lr"]  # cosine schedule
        delta = c.download_delta(job.model_id, tmp_path)
        assert delta.stat().st_size == c.get_model(job.model_id)["delta"]["bytes"]
        preds = c.classify(job.model_id, sorted((root / "query").glob("*.png")), top_k=3)
        assert len(preds) == 3 and all(len(p["labels"]) == 3 for p in preds)
        assert os.path.exists(delta)


def test_client_validation_split_evaluate_and_threshold(server, tmp_path: Path) -> None:
    from sparseshot import sample_data

    api, env = server
    with Client(api.base, _create_key(env)) as c:
        root = sample_data.generate(tmp_path / "s", per_class=6, queries=1)
        ds = c.create_dataset("shapes", list(sample_data.CLASSES))
        assert len(c.upload(ds, root / "train")["added"]) == 18
        job = c.train(ds, preset="quick", params={"n_iters": 3, "batch_size": 6},
                      validation={"holdout_per_class": 2}).wait(timeout=180)
        assert job.data["validation"] == {"holdout_per_class": 2}
        metrics = c.get_model(job.model_id)["metrics"]
        assert metrics["val_images"] == 6 and metrics["train_images"] == 12, metrics
        assert 0.0 <= metrics["val_accuracy"] <= 1.0
        points = c.history(job)
        assert points[-1]["val_accuracy"] is not None, points  # the final report always measures

        ev = c.evaluate(job.model_id, ds)
        assert ev["n_images"] == 18 and sum(map(sum, ev["confusion_matrix"])) == 18
        assert sum(m["support"] for m in ev["per_class"].values()) == 18
        assert c.list_evaluations(job.model_id)[0]["id"] == ev["id"]
        queries = sorted((root / "query").glob("*.png"))
        cut = c.classify(job.model_id, queries, top_k=3, threshold=ev["suggested_thresholds"])
        for p in cut:  # every label kept reaches its class's threshold
            assert all(lab["score"] >= ev["suggested_thresholds"][lab["label"]] for lab in p["labels"])
            assert p["unknown"] == (not p["labels"])
        for p in c.classify(job.model_id, queries, threshold=1.0):  # only a saturated probability passes
            assert all(lab["score"] >= 1.0 for lab in p["labels"]) and p["unknown"] == (not p["labels"])
