"""The "AI governance" page in a real browser, inside the real Airflow UI.

The example DAG ``governance_showcase`` runs in Airflow (``dag.test()``) against a named fake model server
(FakeOpenAIServer), writing an allowed call, a denied model and a budget stop into a governance store.
Then the test starts the Airflow API server (which serves the UI) on a free port with a private
AIRFLOW_HOME, the plugin loaded and the test session's metadata database, signs in through
``POST /auth/token``, and drives headless Chromium: the page must show the rows that run produced, and
the extra link of a task must open the task instance's tab filtered to that task. Screenshots are kept
under ``test-artifacts/``. Everything started here is stopped here (the server's whole process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from governed_ai.core.audit import AuditRecord, AuditStore, StoredAuditRecord
from governed_ai.core.paths import provider_home
from governed_ai.core.sqlstore import create_store_engine
from governed_ai.hooks.governance import DEV_KEY_FILE, GovernanceHook
from governed_ai.plugins import urls

pytestmark = [pytest.mark.browser, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
DAG_ID = "governance_showcase"
SERVER_READY_SECONDS = 90
PAGE_WAIT_SECONDS = 30
CHROMEDRIVER = "/usr/bin/chromedriver"  # from the Debian chromium-driver package
INSTALL_HINT = (
    "The browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) "
    "and selenium in the venv (requirements/dev.in)."
)
XSS_PROBE = '<img src="x" onerror="window.__pwned = true">'


@dataclass
class RunningUI:
    base_url: str
    token: str
    store: AuditStore
    run_id: str
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def plugin_is_registered_by_entry_point() -> bool:
    return any(ep.value.startswith("governed_ai.plugins") for ep in entry_points(group="airflow.plugins"))


def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_until_serving(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the API server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            health = http_json(f"{base_url}/api/v2/monitor/health")
            if health.get("metadatabase", {}).get("status") == "healthy":
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the API server did not answer within {SERVER_READY_SECONDS} s:\n{log.read_text()[-4000:]}")


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ui(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningUI]:
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    from governed_ai.local_model import CONNECTION_ENV, ECONOMY_PRICE, NOMINAL_PRICE
    from tests.fakes.openai_server import FakeOpenAIServer, ScriptedReply

    home = tmp_path_factory.mktemp("ui-airflow-home")
    store_url = f"sqlite:///{home / 'governance.db'}"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"

    with pytest.MonkeyPatch.context() as patch, FakeOpenAIServer(models=("smollm2",)) as model:
        # Priced like the local model: the team budget limits cost, and an unpriced model is refused.
        prices = {"smollm2": NOMINAL_PRICE, "smollm2-economy": ECONOMY_PRICE}
        patch.setenv(CONNECTION_ENV, model.connection_json(default_model="smollm2", prices=prices))
        patch.setenv("AIRFLOW__GOVERNED_AI__STORE_URL", store_url)
        patch.setenv("AIRFLOW__API__BASE_URL", f"{base_url}/")
        # Usage like the real model's, so that the per-run budget (300 tokens) stops over_budget (256 more).
        model.script(
            ScriptedReply(content="A data pipeline moves data.", prompt_tokens=45, completion_tokens=12)
        )
        run = DagBag(dag_folder=str(REPO / "example_dags")).dags[DAG_ID].test()
    # The DAG's own last task checks that its audit trail has the allowed call, the denial and the stop.
    assert run.state == "success", f"the showcase run ended {run.state}"

    engine = create_store_engine(store_url)
    hook = GovernanceHook()
    store = AuditStore(engine, key=hook.audit_key(), anchors=hook.anchor_log())  # as the tasks write it
    assert store.query(dag_id=DAG_ID, run_id=run.run_id, decision="deny", limit=None), (
        "the run denied nothing"
    )
    # Audit data holds model output and error text: it must reach the page as text, never as markup.
    store.append(
        AuditRecord(dag_id="xss_probe", run_id="probe", task_id="t", action="model.call", error=XSS_PROBE)
    )

    plugins = home / "plugins"
    plugins.mkdir()
    if not plugin_is_registered_by_entry_point():
        (plugins / "governed_ai_plugin.py").write_text(
            "from governed_ai.plugins.plugin import GovernedAIPlugin\n"
        )
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": "admin"}))
    env = {key: value for key, value in os.environ.items() if key != "AIRFLOW__CORE__UNIT_TEST_MODE"}
    env.update(
        AIRFLOW_HOME=str(home),
        # The run above lives in the test session's metadata database: the UI must see the same one.
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=conf.get("database", "sql_alchemy_conn"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(plugins),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__BASE_URL=f"{base_url}/",
        AIRFLOW__GOVERNED_AI__STORE_URL=store_url,
        # The chain is checked with the key and anchors the tasks wrote with (a deployment configures both
        # once for every component; here the tasks used the session's development key file).
        AIRFLOW__GOVERNED_AI__AUDIT_HMAC_KEY=(provider_home() / DEV_KEY_FILE).read_text().strip(),
        AIRFLOW__GOVERNED_AI__AUDIT_ANCHOR_PATH=str(provider_home() / "anchors"),
    )
    log = home / "api-server.log"
    with log.open("wb") as output:
        command = [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port)]
        server = subprocess.Popen(
            [*command, "--workers", "1"],
            env=env, cwd=home, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_serving(server, base_url, log)
        token = http_json(f"{base_url}/auth/token", {"username": "admin", "password": "admin"})[
            "access_token"
        ]
        yield RunningUI(base_url=base_url, token=token, store=store, run_id=run.run_id, log=log)
    finally:
        stop_process_group(server)
        engine.dispose()


@pytest.fixture(scope="module")
def browser(ui: RunningUI) -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed. {INSTALL_HINT}", pytrace=False)
    if not (Path(CHROMEDRIVER).exists() and shutil.which("chromium")):
        pytest.fail(f"chromium/chromedriver not found. {INSTALL_HINT}", pytrace=False)
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,2200"):
        options.add_argument(argument)
    # An explicit driver path: otherwise selenium-manager tries to download one (the machine is offline).
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{ui.base_url}/api/v2/version")  # a page on the origin, so its cookie can be set
        # What the UI's login leaves behind: the session cookie the page's requests carry.
        driver.add_cookie({"name": "_token", "value": ui.token, "path": "/"})
        yield driver
    finally:
        driver.quit()


def open_in_ui(driver: Any, url: str, frame_title: str, screenshot: str) -> None:
    """Open a UI page, switch into the plugin's iframe and wait until the page has loaded its data."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, PAGE_WAIT_SECONDS)
    frame = (By.CSS_SELECTOR, f'iframe[title="{frame_title}"]')
    try:
        wait.until(expected_conditions.frame_to_be_available_and_switch_to_it(frame))
        wait.until(lambda d: d.execute_script("return document.body.dataset.state") in ("ready", "error"))
        if driver.execute_script("return document.body.dataset.state") == "error":
            pytest.fail(f"the page reported: {driver.find_element(By.ID, 'error').text}")
        wait.until(
            lambda d: d.find_element(By.ID, "chain-status").get_attribute("data-ok") in ("true", "false")
        )
    finally:
        driver.switch_to.default_content()
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / screenshot))
    driver.switch_to.frame(driver.find_element(*frame))


def shown_records(driver: Any) -> list[dict[str, str]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#records tbody tr[data-seq]")
    return [
        {
            "seq": row.get_attribute("data-seq"),
            "task_id": row.get_attribute("data-task-id"),
            "action": row.get_attribute("data-action"),
            "decision": row.get_attribute("data-decision"),
            "rule": row.find_element(By.CSS_SELECTOR, "td.rule").text,
        }
        for row in rows
    ]


def as_shown(record: StoredAuditRecord) -> dict[str, str]:
    return {
        "seq": str(record.seq),
        "task_id": record.task_id or "",
        "action": record.action,
        "decision": record.decision,
        "rule": record.rule or "",
    }


def test_the_page_in_the_airflow_ui_shows_what_the_run_just_did(ui, browser):
    from selenium.webdriver.common.by import By

    run_records = ui.store.query(dag_id=DAG_ID, run_id=ui.run_id, limit=None)
    denials = [r for r in run_records if r.decision == "deny"]

    open_in_ui(browser, f"{ui.base_url}/plugin/{urls.NAV_ROUTE}", "AI governance", "governed_ai_ui_page.png")

    shown = {row["seq"]: row for row in shown_records(browser)}
    for record in run_records:
        assert shown.get(str(record.seq)) == as_shown(record)
    run_row = browser.find_element(By.CSS_SELECTOR, f'#runs tbody tr[data-run-id="{ui.run_id}"]')
    assert run_row.get_attribute("data-dag-id") == DAG_ID
    denied_by = run_row.find_element(By.CSS_SELECTOR, "td.denied-by").text
    for rule in {r.rule for r in denials if r.rule}:
        assert rule in denied_by
    chain = browser.find_element(By.ID, "chain-status")
    assert chain.get_attribute("data-ok") == "true"
    assert f"{ui.store.verify().records_checked} records intact" in chain.text
    assert browser.find_elements(By.CSS_SELECTOR, "#spend-chart svg rect"), "the spend chart drew no bars"

    probe = browser.find_element(By.CSS_SELECTOR, '#records tbody tr[data-task-id="t"] td.reason')
    assert XSS_PROBE in probe.text
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#records img")


def test_a_tasks_extra_link_opens_its_audit_records_in_the_task_instance_tab(ui, browser, monkeypatch):
    from airflow.sdk.types import TaskInstanceKey

    from governed_ai.plugins.links import AuditRecordsLink

    monkeypatch.setenv(
        "AIRFLOW__API__BASE_URL", f"{ui.base_url}/"
    )  # as the workers of this deployment have it
    task_id = "over_budget"
    stored = ui.store.query(dag_id=DAG_ID, run_id=ui.run_id, task_id=task_id, limit=None)
    link = AuditRecordsLink().get_link(None, ti_key=TaskInstanceKey(DAG_ID, task_id, ui.run_id))  # type: ignore[arg-type]
    assert link.startswith(ui.base_url)

    open_in_ui(browser, link, "AI audit", "governed_ai_ui_task_instance.png")

    assert [row for row in shown_records(browser)] == [as_shown(r) for r in stored]
    assert ("budget.deny", "deny", "showcase-per-run") in {
        (row["action"], row["decision"], row["rule"]) for row in shown_records(browser)
    }


def test_filters_and_a_click_on_a_run_narrow_the_records(ui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def wait_ready() -> None:
        WebDriverWait(browser, PAGE_WAIT_SECONDS).until(
            lambda d: d.execute_script("return document.body.dataset.state") == "ready"
        )

    open_in_ui(
        browser, f"{ui.base_url}/plugin/{urls.NAV_ROUTE}", "AI governance", "governed_ai_ui_filters.png"
    )

    Select(browser.find_element(By.NAME, "decision")).select_by_value("deny")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait_ready()
    assert shown_records(browser) == [as_shown(r) for r in ui.store.query(decision="deny", limit=None)]

    browser.find_element(By.CSS_SELECTOR, f'#runs tbody tr[data-run-id="{ui.run_id}"]').click()
    wait_ready()
    in_run = ui.store.query(dag_id=DAG_ID, run_id=ui.run_id, decision="deny", limit=None)
    assert shown_records(browser) == [as_shown(r) for r in in_run]
    assert browser.find_element(By.NAME, "run_id").get_attribute("value") == ui.run_id
    # The page's own address keeps the filters (reload and back keep them).
    query = browser.execute_script("return Object.fromEntries(new URLSearchParams(location.search))")
    assert query == {"decision": "deny", "dag_id": DAG_ID, "run_id": ui.run_id}
