"""The operator console over HTTP, against a real ingest (with REFUNDSYNC_CONSOLE_PASSWORD)
and the session's workers: login, search, an order's timeline, failed events, health; and
its defences: every page and action without a session goes to the login, a forged or
expired cookie too, a form without its CSRF token gets 403, wrong passwords are slowed
down, and no page shows what payloads carry about customers."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from sqlalchemy import text

from ingest.console import COOKIE, FREE_FAILURES, SESSION_S, session_key
from tests import deadlines, factories, support
from tests.support import Stack

PASSWORD = "console-test-password"
PII = ("jsmith123@digitalriver.com", "13806 Bren Road", "wbrown@digitalriver.com")


@dataclass
class Console:
    base: str
    order_id: str
    upstream_id: str
    events: list[dict[str, Any]]
    refused_id: str


@pytest.fixture(scope="module")
def console(stack: Stack) -> Iterator[Console]:
    env = {**stack.env, "REFUNDSYNC_CONSOLE_PASSWORD": PASSWORD}
    ingest, base = support.start_ingest(env)
    try:
        order_id, upstream_id = f"ord-{uuid.uuid4().hex[:10]}", f"up-{uuid.uuid4().hex[:10]}"
        events = [
            _published("refund.pending_information.json", orderId=order_id, currency="USD"),
            _published("order.charge.refund.failed.json", id=order_id, upstreamId=upstream_id),
        ]
        refused = _published("order.refunded.json", id=order_id, upstreamId="u" * 10_000)
        for event in [*events, refused]:
            assert support.post_event(base, event).status_code == 202
        support.wait_finished(stack.engine, [e["id"] for e in [*events, refused]])
        yield Console(base, order_id, upstream_id, events, refused["id"])
    finally:
        ingest.stop()


def _published(name: str, **obj: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(support.load_fixture(f"dr_published/{name}"))
    return {
        **event,
        "id": f"evt-{uuid.uuid4().hex}",
        "data": {"object": {**event["data"]["object"], **obj}},
    }


class Operator:
    """A browser's part over plain HTTP: the session cookie is Secure, which httpx keeps
    from http:// URLs, so it is carried by hand."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookie: str | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if self.cookie:
            headers["cookie"] = f"{COOKIE}={self.cookie}"
        response = httpx.request(
            method, f"{self.base}{path}", headers=headers, timeout=10, **kwargs
        )
        found = re.search(rf"{COOKIE}=([^;]*)", response.headers.get("set-cookie", ""))
        if found:
            self.cookie = found.group(1) or None
        return response

    def csrf(self, path: str = "/console/login") -> str:
        page = self.request("GET", path)
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text
        return found.group(1)

    def login(self, password: str = PASSWORD) -> httpx.Response:
        token = self.csrf()
        return self.request("POST", "/console/login", data={"csrf": token, "password": password})


@pytest.fixture
def operator(console: Console) -> Operator:
    signed_in = Operator(console.base)
    response = signed_in.login()
    assert (response.status_code, response.headers["location"]) == (303, "/console/")
    return signed_in


PAGES = ["/console/", "/console/failed", "/console/health", "/console/orders/anything"]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_without_a_session_goes_to_the_login(console: Console, path: str) -> None:
    response = Operator(console.base).request("GET", path)
    assert (response.status_code, response.headers["location"]) == (303, "/console/login")


def test_logging_out_without_a_session_goes_to_the_login(console: Console) -> None:
    response = Operator(console.base).request("POST", "/console/logout", data={"csrf": "x"})
    assert (response.status_code, response.headers["location"]) == (303, "/console/login")


def test_the_session_cookie_is_secure_httponly_strict_and_console_only(console: Console) -> None:
    anonymous = Operator(console.base)
    token = anonymous.csrf()
    response = anonymous.request(
        "POST", "/console/login", data={"csrf": token, "password": PASSWORD}
    )
    cookie = response.headers["set-cookie"].lower()
    for attribute in ("httponly", "secure", "samesite=strict", "path=/console", "max-age="):
        assert attribute in cookie, cookie


def test_search_finds_an_order_by_each_of_its_ids(console: Console, operator: Operator) -> None:
    refund_id = console.events[0]["data"]["object"]["id"]
    for term in (console.order_id, console.upstream_id, console.events[1]["id"], refund_id):
        response = operator.request("GET", "/console/", params={"q": term})
        assert response.status_code == 303, term
        assert response.headers["location"] == f"/console/orders/{console.order_id}"
    nothing = operator.request("GET", "/console/", params={"q": "no-such-order"})
    assert nothing.status_code == 200
    assert 'id="no-match"' in nothing.text


def test_the_order_page_shows_the_summary_and_every_event(
    console: Console, operator: Operator, stack: Stack
) -> None:
    page = operator.request("GET", f"/console/orders/{console.order_id}")
    assert page.status_code == 200
    summary = stack.api(f"/orders/{console.order_id}").json()
    assert f'id="refund-status">{summary["refundStatus"]}<' in page.text
    assert f"{summary['refundedAmount']} {summary['currency']}" in page.text
    for event_id in [*(e["id"] for e in console.events), console.refused_id]:
        assert event_id in page.text
    assert page.headers["cache-control"] == "no-store"


def test_the_failed_page_lists_a_failed_event_with_its_reason(
    console: Console, operator: Operator
) -> None:
    page = operator.request("GET", "/console/failed")
    assert page.status_code == 200
    row = page.text.split(console.refused_id, 1)[1].split("</tr>", 1)[0]
    assert 'class="error"' in row


def test_the_health_page_shows_the_figures(console: Console, operator: Operator) -> None:
    page = operator.request("GET", "/console/health")
    assert page.status_code == 200
    for label in ("queue depth", "journal entries", "oldest unfinished event", "failed events"):
        assert label in page.text

    def both_workers_answer() -> bool:
        # The page names the workers that answered its ping within a second; on a loaded
        # machine one may answer late, and then shows on a later look.
        text = operator.request("GET", "/console/health").text
        workers = text.split('id="workers">', 1)[1].split("</td>", 1)[0]
        return "w1@" in workers and "w2@" in workers

    support.wait_for(
        both_workers_answer,
        timeout=deadlines.LOCAL_PROCESS_S,
        what="the session's two workers named on the health page",
    )


def test_no_page_shows_customer_data(console: Console, operator: Operator) -> None:
    paths = [
        f"/console/orders/{console.order_id}",
        "/console/failed",
        f"/console/?q={console.order_id}x",
    ]
    for path in paths:
        text = operator.request("GET", path).text
        for value in PII:
            assert value not in text, (path, value)


def test_a_form_without_its_csrf_token_is_refused(console: Console, operator: Operator) -> None:
    assert operator.request("POST", "/console/logout").status_code == 403
    assert operator.request("POST", "/console/logout", data={"csrf": "forged"}).status_code == 403
    # Still signed in: the refused logout did nothing.
    assert operator.request("GET", "/console/health").status_code == 200
    anonymous = Operator(console.base)
    anonymous.csrf()
    refused = anonymous.request("POST", "/console/login", data={"password": PASSWORD})
    assert refused.status_code == 403


def test_logout_ends_the_session(console: Console, operator: Operator) -> None:
    token = operator.csrf("/console/health")
    assert operator.request("POST", "/console/logout", data={"csrf": token}).status_code == 303
    again = operator.request("GET", "/console/health")
    assert (again.status_code, again.headers["location"]) == (303, "/console/login")


def _cookie(session: dict[str, Any], key: str, timestamp: float | None = None) -> str:
    """A session cookie as Starlette's SessionMiddleware signs it."""

    class At(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(timestamp if timestamp is not None else time.time())

    data = base64.b64encode(json.dumps(session).encode())
    return At(key).sign(data).decode()


def test_a_forged_or_expired_cookie_goes_to_the_login(console: Console, stack: Stack) -> None:
    forged = Operator(console.base)
    session = {"operator": True, "login_at": time.time(), "csrf": "t"}
    # Signed with the password alone, as an attacker who guessed it would.
    forged.cookie = _cookie(session, session_key(PASSWORD.encode(), PASSWORD))
    assert forged.request("GET", "/console/health").headers["location"] == "/console/login"

    key = session_key(support.queue_keys(stack.db_url).signing_key(), PASSWORD)
    genuine = Operator(console.base)
    genuine.cookie = _cookie(session, key)
    assert genuine.request("GET", "/console/health").status_code == 200

    idle = Operator(console.base)
    idle.cookie = _cookie(session, key, timestamp=time.time() - SESSION_S - 60)
    assert idle.request("GET", "/console/health").headers["location"] == "/console/login"

    too_old = Operator(console.base)
    too_old.cookie = _cookie({**session, "login_at": time.time() - SESSION_S - 60}, key)
    assert too_old.request("GET", "/console/health").headers["location"] == "/console/login"


def test_wrong_passwords_are_slowed_down(stack: Stack) -> None:
    # An ingest of its own: this test's address stays slowed down after it.
    ingest, base = support.start_ingest({**stack.env, "REFUNDSYNC_CONSOLE_PASSWORD": PASSWORD})
    try:
        _slowed_down(Operator(base))
    finally:
        ingest.stop()


def _slowed_down(anonymous: Operator) -> None:
    codes = [anonymous.login("wrong").status_code for _ in range(20)]
    assert codes[:FREE_FAILURES] == [401] * FREE_FAILURES
    assert 429 in codes[FREE_FAILURES:]
    blocked = anonymous.login(PASSWORD)
    # Even the right password waits its turn.
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) >= 1


def test_without_a_password_there_is_no_console(stack: Stack) -> None:
    assert httpx.get(f"{stack.base}/console/login", timeout=10).status_code == 404


def _failed_for_a_passing_cause(stack: Stack, order_id: str) -> dict[str, Any]:
    """A valid event recorded as failed for a cause since fixed (the database was gone
    for every retry), as the worker records one."""
    event = factories.refund_event(order_id, state="succeeded", amount=12.5)
    with stack.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhook_events (id, type, payload, outcome, attempts, error,"
                " order_id, received_at, deliveries)"
                " VALUES (:id, :type, :payload, 'failed', 21, :error, :order_id, now(), 1)"
            ),
            {
                "id": event["id"],
                "type": event["type"],
                "payload": json.dumps(event),
                "error": "database unavailable: gave up after 20 retries",
                "order_id": order_id,
            },
        )
    return event


def test_a_failed_event_is_tried_dry_then_replayed_and_applied(
    console: Console, operator: Operator, stack: Stack
) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _failed_for_a_passing_cause(stack, order_id)
    token = operator.csrf("/console/failed")
    preview = operator.request(
        "POST", f"/console/events/{event['id']}/dry-run", data={"csrf": token}
    )
    assert preview.status_code == 200
    assert 'id="would-be">applied<' in preview.text
    # The dry run changed nothing.
    assert support.outcomes(stack.engine, [event["id"]]) == {event["id"]: "failed"}

    replayed = operator.request(
        "POST", f"/console/events/{event['id']}/replay", data={"csrf": token}
    )
    assert replayed.status_code == 303
    progress = replayed.headers["location"]
    assert support.wait_finished(stack.engine, [event["id"]]) == {event["id"]: "applied"}
    page = operator.request("GET", progress)
    assert 'id="progress">1 of 1 finished<' in page.text
    assert stack.api(f"/orders/{order_id}").json()["refundedAmount"] == "12.50"


def test_every_failed_event_of_a_type_is_replayed_with_its_progress(
    console: Console, operator: Operator, stack: Stack
) -> None:
    events = [_failed_for_a_passing_cause(stack, f"ord-{uuid.uuid4().hex[:10]}") for _ in range(3)]
    token = operator.csrf("/console/failed")
    replayed = operator.request(
        "POST", "/console/failed/replay", data={"csrf": token, "type": "refund.complete"}
    )
    assert replayed.status_code == 303
    ids = [e["id"] for e in events]
    for event_id in ids:
        assert f"id={event_id}" in replayed.headers["location"]
    assert set(support.wait_finished(stack.engine, ids).values()) == {"applied"}
    page = operator.request("GET", replayed.headers["location"])
    assert "finished" in page.text
    # Once all are finished the page stops reloading itself.
    finished = re.search(r'id="progress">(\d+) of (\d+) finished', page.text)
    assert finished
    assert finished.group(1) == finished.group(2)
    assert 'http-equiv="refresh"' not in page.text


def test_actions_without_a_session_or_a_token(console: Console, operator: Operator) -> None:
    actions = ["/console/events/x/dry-run", "/console/events/x/replay", "/console/failed/replay"]
    for path in actions:
        anonymous = Operator(console.base).request("POST", path, data={"csrf": "x"})
        assert (anonymous.status_code, anonymous.headers["location"]) == (303, "/console/login")
        assert operator.request("POST", path, data={"type": "refund.complete"}).status_code == 403


# Where the browser test leaves its screenshots (one per page), for people to look at;
# the README's picture of the order page is one of them.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium, driven through its chromedriver (no downloaded builds)."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    service = ChromeService(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(deadlines.LOCAL_PROCESS_S * 3)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: webdriver.Chrome, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _see(driver: webdriver.Chrome, css: str, text: str, timeout: float = deadlines.APPLY_S) -> None:
    """Wait until the element `css` on the current page shows `text` (pages that reload
    themselves included)."""

    def shown() -> bool:
        try:
            return text in driver.find_element(By.CSS_SELECTOR, css).text
        except WebDriverException:
            return False

    support.wait_for(shown, timeout=timeout, what=f"{css} to show {text!r}")


def test_an_operator_finds_an_order_and_replays_a_failed_event_in_a_browser(
    console: Console, stack: Stack, browser: webdriver.Chrome
) -> None:
    # localhost: a browser keeps Secure cookies on http only for it.
    base = console.base.replace("127.0.0.1", "localhost")
    browser.get(f"{base}/console/orders/{console.order_id}")
    # Not signed in: the login page.
    assert browser.current_url == f"{base}/console/login"
    _shot(browser, "1-login")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form[action='/console/login'] button").click()
    _see(browser, "h1", "Find an order")
    _shot(browser, "2-search")

    browser.find_element(By.NAME, "q").send_keys(console.upstream_id)
    browser.find_element(By.CSS_SELECTOR, "main form button").click()
    _see(browser, "h1", f"Order {console.order_id}")
    timeline = browser.find_element(By.ID, "timeline").text
    for event in console.events:
        assert event["id"] in timeline
    assert "failed" in timeline
    _shot(browser, "3-order")

    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _failed_for_a_passing_cause(stack, order_id)
    browser.get(f"{base}/console/failed")
    _see(browser, "h1", "Failed events")
    _shot(browser, "4-failed")
    row = browser.find_element(By.XPATH, f"//tr[.//code[text()='{event['id']}']]")
    row.find_element(By.CSS_SELECTOR, "button.dry-run").click()
    _see(browser, "#would-be", "applied")
    _shot(browser, "5-dry-run")
    browser.find_element(By.ID, "replay").click()
    _see(browser, "#progress", "1 of 1 finished")
    _shot(browser, "6-replayed")

    browser.get(f"{base}/console/?q={event['id']}")
    _see(browser, "h1", f"Order {order_id}")
    assert "applied" in browser.find_element(By.ID, "timeline").text
    assert browser.find_element(By.ID, "refunded").text == "12.50 USD"

    browser.get(f"{base}/console/health")
    _see(browser, "#health", "queue depth")
    _shot(browser, "7-health")
    page_text = browser.find_element(By.TAG_NAME, "body").text
    for value in PII:
        assert value not in page_text

    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    _see(browser, "h1", "Log in")
    browser.get(f"{base}/console/health")
    assert browser.current_url == f"{base}/console/login"


def test_what_an_operator_types_is_shown_escaped(operator: Operator) -> None:
    page = operator.request("GET", "/console/", params={"q": "<script>alert(1)</script>"})
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
