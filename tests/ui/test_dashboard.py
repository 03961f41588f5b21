"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against the
service under uvicorn and a real local Ray. A pipeline is seen running in the list, its loss curve
gains points while it trains, its dataset shows the trained tokens highlighted, it is cancelled from
the page; runs are compared; a run is evaluated beside its base model, and chatted with beside it;
another tenant sees none of it; 1,000 jobs page server-side. The API
key never appears in a URL, the service's log or a page's source. Each page is saved as a
screenshot under .cache/ui-screens/.

`make test-ui` runs this. Without Chromium or Playwright it skips, unless RAYSFT_REQUIRE_BROWSER is
set (CI sets it, having installed both)."""

from __future__ import annotations

import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
from support import REPO
from support.service import Service, dataset_body, training_body

from service import local_ray, store
from service.store import Job, Kind, Status

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM or not __import__("importlib.util").util.find_spec("playwright"):
    if os.environ.get("RAYSFT_REQUIRE_BROWSER"):
        raise RuntimeError("RAYSFT_REQUIRE_BROWSER is set but Chromium (apt-get install chromium) or Playwright "
                           "(pip install -e '.[test]') is missing")
    pytest.skip("needs Debian's chromium and Playwright for Python", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

SCREENS = REPO / ".cache/ui-screens"
WAIT_MS = 240_000  # a pipeline's preparation and the start of its training, on 2 busy cores


@pytest.fixture(scope="module")
def head():
    ray = local_ray.start(num_cpus=4)
    yield ray
    ray.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model, head):
    svc = Service(tmp_path_factory.mktemp("ui") / "data", tiny_model, head, serve_port=local_ray.free_port())
    yield svc
    svc.kill()


@pytest.fixture(scope="module")
def keys(service):
    with service.session() as session:
        return {tenant: store.create_api_key(session, tenant) for tenant in ("acme", "globex", "bulk")}


@pytest.fixture(scope="module")
def browser():
    SCREENS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Visit:
    """A browser tab on the dashboard that records every URL it requests and checks, on each
    screenshot, that the page's source holds no API key."""

    def __init__(self, browser, service, keys):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.base = f"http://127.0.0.1:{service.port}"
        self.keys = keys
        self.urls: list[str] = []
        self.page.on("request", lambda request: self.urls.append(request.url))

    def sign_in(self, tenant: str) -> None:
        self.page.goto(f"{self.base}/")
        self.page.fill("#api-key", self.keys[tenant])
        self.page.click("button[type=submit]")
        expect(self.page.locator("#range")).to_be_visible()

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SCREENS / f"{name}.png"), full_page=True)
        source = self.page.content()
        assert not [k for k in self.keys.values() if k in source], f"an API key is in the source of {name}"

    def close(self) -> None:
        assert self.urls and not [u for u in self.urls for k in self.keys.values() if k in u]
        self.context.close()


@pytest.fixture
def visit(browser, service, keys):
    tab = Visit(browser, service, keys)
    yield tab
    tab.close()


def points(page: Page, chart: str) -> int:
    return int(page.locator(f"#{chart}").get_attribute("data-points"))


def test_a_pipeline_is_watched_trained_cancelled_and_compared(visit, service, keys):
    page = visit.page
    page.goto(f"{visit.base}/ui/")
    visit.shot("sign-in")
    acme = {"Authorization": f"Bearer {keys['acme']}"}
    data_dir = Path(service.env["RAYSFT_DATA_DIR"])
    # Long enough to watch (it is cancelled once seen), evaluated every 10 steps with a prompt.
    long_run = {"dataset": dataset_body(data_dir, name="watched"),
                "training": training_body(data_dir, name="watched", max_steps=5000, log_every_steps=2,
                                          checkpoint={"every_steps": 1000, "keep": 1},
                                          eval={"every_steps": 10, "prompts": ["How long should I rest a steak?"],
                                                "max_new_tokens": 8})}
    watched = service.http.post("/v1/pipelines", json=long_run, headers=acme).json()["id"]
    visit.sign_in("acme")

    row = page.locator(f"tr[data-job='{watched}']")
    expect(row.locator(".badge")).to_have_text("RUNNING", timeout=WAIT_MS)
    assert row.locator("td").nth(3).inner_text() == "pipeline"
    visit.shot("jobs")

    # The job page: the loss curve gains points between refreshes while the run trains.
    row.locator(f"a[href='#/jobs/{watched}']").click()
    expect(page.locator("#chart-loss svg polyline")).to_be_visible(timeout=WAIT_MS)
    first = points(page, "chart-loss")
    # (Playwright's own matchers: the page's content policy refuses evaluated strings, as it should.)
    expect(page.locator("#chart-loss")).not_to_have_attribute("data-points", str(first), timeout=60_000)
    assert points(page, "chart-loss") > first and points(page, "chart-lr") > 0
    expect(page.locator("#answers td.answer").first).to_be_visible(timeout=60_000)
    assert points(page, "chart-eval") >= 1 and points(page, "chart-perplexity") >= 1
    figures = page.locator(".figure .label").all_inner_texts()
    assert "sequence accuracy" in figures and "GPU memory peak" not in figures  # CPU workers report no GPU figure
    trained = page.locator(".figure", has=page.locator(".label", has_text="tokens trained")).locator(".value")
    assert int(re.sub(r"\D", "", trained.inner_text())) > 0  # the run's running total, as the locale writes it
    assert page.locator("#answers td").nth(1).inner_text() == "How long should I rest a steak?"
    expect(page.locator("#log")).to_contain_text("step")

    # What the model is trained on: rendered examples with the trained tokens highlighted.
    trained = page.locator("#dataset pre.example mark.trained")
    expect(trained.first).to_be_visible()
    report = service.http.get(f"/v1/jobs/{watched}/dataset", headers=acme).json()
    expected = [s["text"] for s in report["manifest"]["examples"][0] if s["trained"]]
    assert page.locator("#dataset pre.example").first.locator("mark.trained").all_inner_texts() == expected
    assert "<|im_start|>assistant" in page.locator("#dataset pre.example").first.inner_text()
    accepted = str(report["manifest"]["counts"]["accepted"])
    expect(page.locator("#dataset table.facts").first).to_contain_text(accepted)
    visit.shot("job-training")
    page.locator("#dataset").screenshot(path=str(SCREENS / "job-dataset.png"))

    # Cancel, confirmed in the browser's dialog: the Ray job stops and the page says so.
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(".job-header button.cancel").click()
    expect(page.locator(".job-header h1 .badge")).to_have_text("CANCELLED", timeout=60_000)
    assert service.http.get(f"/v1/jobs/{watched}", headers=acme).json()["status"] == "CANCELLED"
    visit.shot("job-cancelled")

    # A second, short run; then both overlaid on the compare page, picked in the list.
    short = service.http.post("/v1/pipelines", headers=acme, json={
        "dataset": dataset_body(data_dir, name="short"), "training": training_body(data_dir, name="short")}).json()["id"]
    assert service.wait(short, headers=acme)[-1]["status"] == "SUCCEEDED"
    page.goto(f"{visit.base}/ui/#/jobs?kind=pipeline")
    expect(page.locator(f"tr[data-job='{short}'] .badge")).to_have_text("SUCCEEDED")
    page.check(f"tr[data-job='{watched}'] input[type=checkbox]")
    page.check(f"tr[data-job='{short}'] input[type=checkbox]")
    page.click("#compare")
    expect(page.locator("#chart-compare-loss polyline")).to_have_count(2)
    series = page.locator("#chart-compare-loss polyline")
    assert {series.nth(i).get_attribute("data-series") for i in range(2)} == {
        f"watched ({watched[:8]})", f"short ({short[:8]})"}
    assert int(page.locator("#chart-compare-loss polyline[data-series^='short']").get_attribute("data-points")) == 6
    visit.shot("compare")

    # The short run's adapter evaluated as a job of its own: the page shows its figures beside the
    # base model's, and both models' answers.
    pipeline = service.http.get(f"/v1/jobs/{short}", headers=acme).json()
    evaluation = service.http.post("/v1/evaluations", headers=acme, json={
        "name": "short-eval", "model": pipeline["spec"]["training"]["model"], "adapter": f"job:{short}",
        "dataset": f"job:{pipeline['children'][0]}",
        "generation": {"prompts": ["How long should I rest a steak?"], "max_new_tokens": 8}}).json()
    assert service.wait(evaluation["id"], headers=acme)[-1]["status"] == "SUCCEEDED"
    page.goto(f"{visit.base}/ui/#/jobs/{evaluation['id']}")
    expect(page.locator("#evaluation thead")).to_contain_text("fine-tuned")
    assert page.locator("#evaluation thead th").all_inner_texts() == ["", "fine-tuned", "base model"]
    assert page.locator("#evaluation tbody tr").first.inner_text().startswith("eval loss")
    expect(page.locator("#answers td.answer")).to_have_count(2)
    assert page.locator("#dataset").inner_text() == ""  # an evaluation prepares no dataset
    visit.shot("job-evaluation")
    # Beside the training it came from: each links to the other.
    page.click("#evaluated")
    expect(page.locator("#evaluations")).to_contain_text("short-eval")
    expect(page.locator(f"#evaluations a[href='#/jobs/{evaluation['id']}']")).to_have_count(1)

    # Try it: a message to the fine-tuned model and, beside it, the base model, answered by the
    # models on the cluster (Ray Serve: the first chat deploys and loads the base model).
    page.fill("#chat-prompt", "How long should I rest a steak?")
    page.click("#chat-send")
    expect(page.locator("#chat-send")).to_be_enabled(timeout=WAIT_MS)
    for side in ("fine-tuned", "base model"):
        log = page.locator(f".chat-log[data-side='{side}']")
        expect(log.locator(".chat-user")).to_have_text("How long should I rest a steak?")
        expect(log.locator(".chat-assistant")).to_have_count(1)
        assert "error" not in (log.locator(".chat-assistant").get_attribute("class") or ""), log.inner_text()
    visit.shot("try-it")

    # Another tenant's key: no jobs, and the pipeline's page is not found.
    page.click("#sign-out")
    visit.sign_in("globex")
    expect(page.locator("#view tbody")).to_have_text("No jobs.")
    expect(page.locator("#range")).to_have_text("0 jobs")
    page.goto(f"{visit.base}/ui/#/jobs/{watched}")
    expect(page.locator("#problem")).to_have_text(f"no job {watched}")
    assert page.locator("#chart-loss").count() == 0
    visit.shot("other-tenant")

    # The key is in no log line of the service either.
    log = (service.log).read_text()
    assert not [k for k in keys.values() if k in log]


def test_a_thousand_jobs_page_server_side(visit, service, record_property):
    started = store.now()
    with service.session() as session:
        session.add_all(Job(tenant_id="bulk", kind=Kind.TRAINING if n % 4 else Kind.DATASET,
                            status=Status.FAILED if n % 10 == 0 else Status.SUCCEEDED,
                            spec={"name": f"run-{n:04d}"}, request_hash="0" * 64, submitted=True,
                            created_at=started - timedelta(seconds=n), finished_at=started - timedelta(seconds=n))
                        for n in range(1000))
        session.commit()
    page = visit.page
    asked = time.monotonic()
    visit.sign_in("bulk")
    expect(page.locator("#range")).to_have_text("1–50 of 1000")
    first_page_s = time.monotonic() - asked
    assert page.locator("#view tbody tr").count() == 50
    assert page.locator("#view tbody tr").first.locator("td").nth(2).inner_text() == "run-0000"
    visit.shot("jobs-1000")

    asked = time.monotonic()
    page.click("text=Older ›")
    expect(page.locator("#range")).to_have_text("51–100 of 1000")
    next_page_s = time.monotonic() - asked
    assert page.locator("#view tbody tr").first.locator("td").nth(2).inner_text() == "run-0050"

    page.select_option("#filter-status", "FAILED")
    expect(page.locator("#range")).to_have_text("1–50 of 100")
    page.select_option("#filter-kind", "dataset")  # every tenth failed, every fourth a dataset: 50 both
    expect(page.locator("#range")).to_have_text("1–50 of 50")
    expect(page.locator("text=Older ›")).to_be_disabled()
    assert "status=FAILED" in page.url and "kind=dataset" in page.url
    record_property("first_page_s", round(first_page_s, 2))
    record_property("next_page_s", round(next_page_s, 2))
    assert first_page_s < 5 and next_page_s < 2


def test_a_sweeps_trainings_link_to_their_comparison(visit, service):
    sweep, ids = "5" * 32, ["a" * 32, "b" * 32]
    with service.session() as session:
        session.add_all(Job(id=job_id, tenant_id="bulk", kind=Kind.TRAINING, status=Status.SUCCEEDED,
                            spec={"name": f"lr-{n + 1}"}, request_hash="0" * 64, submitted=True, sweep_id=sweep,
                            created_at=store.now() + timedelta(microseconds=n)) for n, job_id in enumerate(ids))
        session.commit()
    page = visit.page
    visit.sign_in("bulk")
    page.goto(f"{visit.base}/ui/#/jobs/{ids[1]}")
    link = page.locator("#compare-sweep")
    expect(link).to_have_attribute("href", f"#/compare/{ids[0]},{ids[1]}")
    expect(page.locator(".job-header")).to_contain_text("one of the 2 runs of sweep 55555555")
    link.click()
    expect(page).to_have_url(f"{visit.base}/ui/#/compare/{ids[0]},{ids[1]}")
