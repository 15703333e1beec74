"""The web console and the API docs in a real browser: headless Chromium (Debian's) over Selenium.

A real `sparseshot serve` (embedded worker, tiny random base) on a free loopback port; the test
drives the whole flow as a person would: key -> dataset -> upload (files and a .zip, with a
rejected file) -> gallery -> relabel and delete -> training with live progress -> model page ->
classify a dropped image -> delta download -> evaluation on the dataset. A screenshot of each page
is saved under tests/e2e/artifacts/console/ (or $SPARSESHOT_TEST_ARTIFACTS) and its path printed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_service_e2e import COLORS, Proc, _create_key, _env, _png, _serve, procs  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("SPARSESHOT_TEST_ARTIFACTS", Path(__file__).parent / "artifacts")) / "console"
TRAIN_PARAMS = '{"n_iters": 50, "batch_size": 6, "lr": 0.01}'
WAIT_S = 30


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true (scripts/ci-services.sh installs it)")
    pytest.skip(f"{what} not installed")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with downloads going to tmp_path/downloads."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(exe):
            _missing(exe)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-background-networking"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads")})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """Waits and screenshots over one driver."""

    def __init__(self, driver: Any, base: str) -> None:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.base, self.By = driver, base, By
        # A page re-render can detach an element between finding it and reading it: poll again.
        self._wait = lambda t: WebDriverWait(driver, t, ignored_exceptions=[StaleElementReferenceException])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def css(self, sel: str) -> Any:
        return self.d.find_element(self.By.CSS_SELECTOR, sel)

    def all(self, sel: str) -> list[Any]:
        return list(self.d.find_elements(self.By.CSS_SELECTOR, sel))

    def until(self, cond: Any, timeout: float = WAIT_S, what: str = "") -> Any:
        try:
            return self._wait(timeout).until(lambda _d: cond())
        except Exception as e:
            err = self.d.execute_script("return document.getElementById('error').innerText")
            raise AssertionError(f"timed out waiting for {what}; page error box: {err!r}") from e

    def text_in(self, sel: str, text: str, timeout: float = WAIT_S) -> None:
        self.until(lambda: any(text in e.text for e in self.all(sel)), timeout, f"{text!r} in {sel}")

    def shot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        height = self.d.execute_script("return document.documentElement.scrollHeight")
        self.d.set_window_size(1280, max(1000, min(int(height) + 120, 4000)))  # the whole page
        self.d.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    def drop(self, zone_child: str, path: Path, media_type: str = "image/png") -> None:
        """Drop a file on the drop zone holding `zone_child`, as a drag from the desktop would."""
        self.d.execute_script(
            """const [sel, b64, name, type] = arguments;
               const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
               const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type}));
               const zone = document.querySelector(sel).closest('.dropzone');
               const init = {dataTransfer: dt, bubbles: true, cancelable: true};
               zone.dispatchEvent(new DragEvent('dragover', init));
               zone.dispatchEvent(new DragEvent('drop', init));""",
            zone_child, base64.b64encode(path.read_bytes()).decode(), path.name, media_type,
        )

    def select(self, sel: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.css(sel)).select_by_value(value)


def _write_images(folder: Path) -> dict[str, list[Path]]:
    """Three PNGs per class (distinct bytes), plus a blue zip, a mislabelled one and a broken file."""
    folder.mkdir()
    out: dict[str, list[Path]] = {}
    for label, colour in COLORS.items():
        out[label] = []
        for i in range(3):
            p = folder / f"{label}{i}.png"
            p.write_bytes(_png(colour, 10 * i + len(label)))
            out[label].append(p)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, p in enumerate(out.pop("blue")):
            zf.writestr(f"blue/{p.name}", p.read_bytes())
            zf.writestr(f"blue/extra{i}.png", _png(COLORS["blue"], 200 + i))
    (folder / "blue.zip").write_bytes(buf.getvalue())
    (folder / "odd-one.png").write_bytes(_png(COLORS["blue"], 300))  # uploaded as red, then relabelled
    (folder / "spare.png").write_bytes(_png(COLORS["green"], 301))  # uploaded, then deleted
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return out


def _check_chart_drawn(page: Page) -> None:
    # The canvas has pixels of the loss colour (#1f4e79): a curve was drawn, not just the frame.
    n = page.d.execute_script(
        """const c = document.getElementById('job-chart'); const d = c.getContext('2d')
             .getImageData(0, 0, c.width, c.height).data; let n = 0;
           for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i]-31)<20 && Math.abs(d[i+1]-78)<20
             && Math.abs(d[i+2]-121)<20) n++; return n;"""
    )
    assert n > 30, f"no loss curve on the chart ({n} pixels)"


def test_console_whole_flow_in_chromium(tmp_path: Path, procs: list[Proc], browser: Any) -> None:  # noqa: F811
    env = _env(tmp_path / "data")
    server = _serve(env, tmp_path, procs)
    key = _create_key(env)
    http = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    files = _write_images(tmp_path / "images")
    page = Page(browser, server.base)

    # Key.
    browser.get(server.base + "/")
    page.text_in("#need-key", "Enter an API key")
    page.shot("01-key")
    page.css("#api-key").send_keys(key)
    page.css("#key-save").click()
    page.text_in("h1", "Datasets")
    assert browser.execute_script("return localStorage.getItem('sparseshot.apiKey')") == key

    # A refused request shows its problem+json, then a dataset is created.
    form = page.css("#dataset-create")
    form.find_element(page.By.NAME, "name").send_keys("colours")
    form.find_element(page.By.NAME, "classes").send_keys("red")
    form.find_element(page.By.CSS_SELECTOR, "button").click()
    page.text_in("#error", "Validation error (422)")
    assert "classes" in page.css("#error").text
    form.find_element(page.By.NAME, "classes").send_keys(", green, blue")
    form.find_element(page.By.CSS_SELECTOR, "button").click()
    page.text_in("h1", "Dataset: colours")
    dataset_id = browser.current_url.rsplit("/", 1)[1]

    # Upload: images per class through the file input, a zip, and a broken file.
    for label in ("red", "green"):
        page.select("#upload-label", label)
        page.css("#upload-input").send_keys("\n".join(str(p) for p in files[label]))
        page.until(lambda lb=label: len(page.all(f'section[data-class="{lb}"] .thumb')) == 3, what=label)
    page.css("#upload-input").send_keys(str(tmp_path / "images" / "blue.zip"))
    page.until(lambda: len(page.all('section[data-class="blue"] .thumb')) == 6, what="zip")
    page.select("#upload-label", "red")
    page.drop("#upload-input", tmp_path / "images" / "odd-one.png")  # drag and drop
    page.text_in("#upload-results li", "added: odd-one.png")
    for name in ("spare.png", "broken.png"):
        page.css("#upload-input").send_keys(str(tmp_path / "images" / name))
        page.text_in("#upload-results li", name)
    rejected = [e.text for e in page.all("#upload-results li.rejected")]
    assert len(rejected) == 1 and "broken.png" in rejected[0] and "image" in rejected[0], rejected
    page.until(lambda: len(page.all('section[data-class="red"] .thumb')) == 5, what="red extras")
    page.until(
        lambda: all(browser.execute_script("return arguments[0].naturalWidth", i) > 0
                    for i in page.all(".thumb img")), what="thumbnails loaded")
    page.shot("02-dataset-gallery")

    # Relabel one image, delete another (checked through the API).
    items = {i["filename"]: i for i in http.get(f"/v1/datasets/{dataset_id}/images").json()}
    odd, spare = items["odd-one.png"]["image_id"], items["spare.png"]["image_id"]
    page.select(f'.thumb[data-image-id="{odd}"] select.relabel', "blue")
    page.until(lambda: len(page.all(f'section[data-class="blue"] .thumb[data-image-id="{odd}"]')) == 1,
               what="relabelled")
    page.css(f'.thumb[data-image-id="{spare}"] button.delete').click()
    page.until(lambda: not page.all(f'.thumb[data-image-id="{spare}"]'), what="deleted")
    counts = http.get(f"/v1/datasets/{dataset_id}").json()["image_counts"]
    assert counts == {"red": 3, "green": 3, "blue": 7}, counts
    page.text_in("#dataset-counts", "blue: 7")

    # Train with small params; the job page polls until it succeeds and draws the curves.
    job_form = page.css("#job-create")
    job_form.find_element(page.By.NAME, "params").send_keys(TRAIN_PARAMS)
    job_form.find_element(page.By.NAME, "holdout").send_keys("0.2")  # one image of each class held out
    job_form.find_element(page.By.CSS_SELECTOR, "button[type=submit]").click()
    page.until(lambda: "#/jobs/" in browser.current_url, what="job page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    page.until(lambda: page.all('#job-status [data-status="succeeded"]'), 240, "job succeeded")
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["params"]["n_iters"] == 50, job
    assert job["validation"] == {"holdout": 0.2}, job
    total = job["progress"]["total_steps"]
    assert page.css("#job-step").text == f"{total} / {total}"
    _check_chart_drawn(page)
    page.shot("03-job-progress")

    # Model page: metrics, try it with a dropped image (the file input), the delta download.
    page.css("#job-model-link").click()
    page.text_in("h1", "Model")
    model = http.get(f"/v1/models/{job['model_id']}").json()
    assert "red, green, blue" in page.css("#model-info").text
    val = model["metrics"]["validation"]  # the validation card: the job's held-out images
    assert val["mode"] == "holdout" and val["n_images"] == 3, val
    assert page.css("#val-accuracy").text == f"{100 * val['accuracy']:.1f} %"
    cells = [[int(td.text) for td in tr.find_elements(page.By.TAG_NAME, "td")]
             for tr in page.all("#val-confusion tr")[1:]]
    assert cells == val["confusion_matrix"]
    rows = page.all("#val-per-class tr[data-class]")
    assert [tr.get_attribute("data-class") for tr in rows] == val["classes"]
    assert "confusion_matrix" not in page.css("#model-metrics").text  # not dumped as JSON there
    page.drop("#classify-input", files["green"][0])  # drag and drop
    page.text_in("#classify-results", files["green"][0].name)
    page.css("#classify-input").send_keys(str(files["red"][0]))
    page.text_in("#classify-results", files["red"][0].name)
    page.until(lambda: len(page.all("#classify-results .bar")) == 3, what="top-k bars")
    labels = [b.get_attribute("data-label") for b in page.all("#classify-results .bar")]
    assert sorted(labels) == ["blue", "green", "red"]
    expected = http.post(f"/v1/models/{model['id']}/classify", data={"top_k": "3"},
                         files=[("files", ("q.png", files["red"][0].read_bytes(), "image/png"))]).json()
    assert labels == [lab["label"] for lab in expected["predictions"][0]["labels"]]
    page.css("#delta-fetch").click()
    page.until(lambda: page.all("#delta-link"), what="delta link")
    size = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('delta-link').href).then(r => r.arrayBuffer())"
        ".then(b => done(b.byteLength));"
    )
    assert size == model["delta"]["bytes"] == len(http.get(f"/v1/models/{model['id']}/delta").content)
    page.select("#export-format", "onnx")  # the ONNX classifier, built by the server on request
    page.css("#delta-fetch").click()
    page.until(lambda: page.all("#export-link-onnx"), 120, "ONNX link")
    onnx_size = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('export-link-onnx').href).then(r => r.arrayBuffer())"
        ".then(b => done(b.byteLength));"
    )
    assert onnx_size == len(http.get(f"/v1/models/{model['id']}/export", params={"format": "onnx"}).content)
    page.shot("04-model-try")

    # Evaluate on the training dataset; the page shows what the API stored.
    page.text_in("#model-evaluation", "Not evaluated yet.")
    page.select("#eval-dataset", dataset_id)
    page.css("#eval-run").click()
    page.until(lambda: page.all("#eval-confusion"), 120, "evaluation shown")
    (ev,) = http.get(f"/v1/models/{model['id']}/evaluations").json()
    assert page.css("[data-evaluation]").get_attribute("data-evaluation") == ev["id"]
    assert page.css("#eval-accuracy").text == f"{100 * ev['accuracy']:.1f} %" and ev["n_images"] == 13
    cells = [[int(td.text) for td in tr.find_elements(page.By.TAG_NAME, "td")]
             for tr in page.all("#eval-confusion tr")[1:]]
    assert cells == ev["confusion_matrix"]
    page.shot("05-model-evaluation")


def test_docs_render_offline_in_chromium(tmp_path: Path, procs: list[Proc], browser: Any) -> None:  # noqa: F811
    server = _serve(_env(tmp_path / "data"), tmp_path, procs)
    page = Page(browser, server.base)
    browser.get(server.base + "/docs")
    page.until(lambda: len(page.all(".opblock")) >= 20, what="swagger operations")
    page.text_in(".opblock-summary", "Start a training job")
    page.shot("05-docs-swagger")
    # "Try it out" on Start a training job fills in the schema's example, not placeholder strings.
    op = page.css("#operations-jobs-create_job_v1_jobs_post")
    op.find_element(page.By.CSS_SELECTOR, ".opblock-summary").click()
    page.until(lambda: op.find_elements(page.By.CSS_SELECTOR, ".try-out__btn"), what="try it out")
    op.find_element(page.By.CSS_SELECTOR, ".try-out__btn").click()
    area = "textarea.body-param__text"
    body = page.until(lambda: op.find_elements(page.By.CSS_SELECTOR, area), what="request body")
    sent = json.loads(body[0].get_attribute("value"))
    assert sent["params"]["n_iters"] == 50 and "base_model" not in sent, sent
    browser.get(server.base + "/redoc")
    page.until(lambda: "Start a training job" in browser.find_element(page.By.TAG_NAME, "body").text, 60,
               "redoc rendered")
    page.shot("06-docs-redoc")
