#!/usr/bin/env python3
"""The pages in a real browser: headless Chromium, driven over WebDriver (selenium),
against a `redpacket-wallet serve` this script starts on real Redis and MariaDB.

    tests/browser/pages.py --bin target/debug/redpacket-wallet --out .data/screenshots

The operator console: sign-in (a wrong key refused, the key kept in sessionStorage
only), creating an activity (the API's validation message beside its field), scenes
and budget, the figures and the chart following awards issued through the API while
a bounded worker books them, a switch flipped with its confirmation (and the API
agreeing), reconciliation reports with a real mismatch highlighted, leak repair and
in-doubt release confirmations stating the amount, health. The wallet page: sign-in
with a JWT, balance and flows with pending items marked and paging, a withdraw
double-clicked that withdraws once and shows the forced settlement and the new
balance, an error in words, the tokens kept on the device synced back. Screenshots of
both pages at desktop and phone width go to --out. Exits non-zero on the first
failed check.
"""
import argparse
import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import (
    SessionNotCreatedException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ADMIN_KEY = "console-test-admin-key"
CALLER_KEY = "upstream-test-key"
JWT_SECRET = "browser-test-jwt-secret"
DESKTOP = (1280, 1000)
PHONE = (360, 760)

checks = 0


def check(condition, what, seen=None):
    """One check; `seen` is what was compared, printed when it fails."""
    global checks
    if not condition:
        raise AssertionError(what if seen is None else f"{what}; seen: {seen!r}")
    checks += 1
    print(f"  ok  {what}")


# ---- the service --------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service_:
    """One `serve` process on its own database and Redis prefix."""

    def __init__(self, binary, redis_url, mysql_url, workdir):
        self.binary = binary
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        suffix = f"{os.getpid()}_{random.randrange(1 << 30)}"
        url = urllib.parse.urlsplit(mysql_url)
        self.db_name = f"rpw_browser_{suffix}"
        self.mysql_url = urllib.parse.urlunsplit(url._replace(path="/" + self.db_name))
        self.mysql = url
        self.prefix = f"rpwbrowser{suffix}:"
        self.redis_url = redis_url
        self.workdir = workdir
        self.env = dict(
            os.environ,
            RPW_HTTP__ADDR=f"127.0.0.1:{self.port}",
            RPW_REDIS__URL=redis_url,
            RPW_REDIS__KEY_PREFIX=self.prefix,
            RPW_REDIS__PARTITIONS="8",
            RPW_MYSQL__URL=self.mysql_url,
            RPW_AUTH__ADMIN_KEY=ADMIN_KEY,
            RPW_AUTH__CALLER_KEYS=f"upstream:{CALLER_KEY}",
            RPW_AUTH__PAYOUT_CALLERS="upstream",
            RPW_AUTH__JWT_SECRET=JWT_SECRET,
            RPW_KEYS__DIR=os.path.join(workdir, "keys"),
            # A bound low enough that a burst of awards is a backlog the chart shows
            # draining.
            RPW_SETTLE__MAX_TPS="10",
            RPW_SETTLE__BATCH_SIZE="5",
            RPW_SHADOW__ENABLED="false",
            # Webhooks: a sender killed mid-delivery holds its lease this long.
            RPW_WEBHOOKS__POLL_MS="100",
            RPW_WEBHOOKS__TIMEOUT_MS="5000",
            RPW_WEBHOOKS__LEASE_MS="6000",
            RPW_LOG="warn",
            RUST_LOG="warn",
        )
        self.env.pop("RPW_REDIS__CLUSTER_URLS", None)
        self.proc = None

    def cli(self, *args, ok=True):
        out = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if (out.returncode == 0) != ok:
            raise RuntimeError(f"{args}: {out.stderr[-2000:]}")
        return out.stdout.strip()

    def start(self, migrate=True):
        if migrate:
            self.cli("migrate")
            self.cli("keys", "generate")
        self.log = open(os.path.join(self.workdir, "serve.log"), "a")
        self.proc = subprocess.Popen([self.binary, "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: see {self.log.name}")
            try:
                status, _ = self.call("GET", "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("serve did not become ready")

    def kill9(self):
        self.proc.kill()  # SIGKILL: no shutdown, nothing recorded
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self):
        sql = f"DROP DATABASE IF EXISTS `{self.db_name}`"
        client = shutil.which("mariadb") or shutil.which("mysql")
        subprocess.run(
            [client, "--protocol=TCP", f"-h{self.mysql.hostname}", f"-P{self.mysql.port or 3306}",
             f"-u{self.mysql.username}", f"-p{self.mysql.password}", "-e", sql],
            capture_output=True,
        )
        self.redis_cli("EVAL",
                       "local n=0 for _,k in ipairs(redis.call('KEYS', ARGV[1]..'*')) do redis.call('DEL', k) n=n+1 end return n",
                       "0", self.prefix)

    def sql(self, statement):
        client = shutil.which("mariadb") or shutil.which("mysql")
        out = subprocess.run(
            [client, "--protocol=TCP", f"-h{self.mysql.hostname}", f"-P{self.mysql.port or 3306}",
             f"-u{self.mysql.username}", f"-p{self.mysql.password}", "-N", "-B", self.db_name, "-e", statement],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return out.stdout.strip()

    def redis_cli(self, *args):
        url = urllib.parse.urlsplit(self.redis_url)
        return subprocess.run(["redis-cli", "-h", url.hostname, "-p", str(url.port or 6379), *args],
                              capture_output=True, text=True).stdout.strip()

    def call(self, method, path, body=None, bearer=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def admin(self, method, path, body=None):
        return self.call(method, path, body, ADMIN_KEY)

    def award_batch(self, awards):
        status, body = self.call("POST", "/v1/awards:batch", {"awards": awards}, CALLER_KEY)
        assert status == 200, (status, body)
        return body["results"]


# ---- the browser ----------------------------------------------------------------------


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Chromium sometimes exits while starting on a loaded machine ("session not created:
    # Chrome instance exited"); that is the browser failing to start, not a page failing
    # a check, so starting it is tried three times before giving up.
    for attempt in range(1, 4):
        service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
        try:
            driver = webdriver.Chrome(service=service, options=options)
            break
        except SessionNotCreatedException as err:
            if attempt == 3:
                raise
            print(f"  chromium did not start (attempt {attempt}): {err.msg.splitlines()[0]}")
            time.sleep(2)
    driver.set_window_size(*DESKTOP)
    return driver


def wait(driver, predicate, what, timeout=20):
    try:
        # The pages replace their figures and rows on every refresh: an element found a
        # moment ago may be gone, and the predicate is asked again.
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=[StaleElementReferenceException]).until(lambda d: predicate())
    except TimeoutException:
        raise AssertionError(f"timed out waiting for: {what}")


def text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def visible(driver, element_id):
    return driver.find_element(By.ID, element_id).is_displayed()


def figure(driver, name, scope="figures"):
    # Read in one script call: the figures are re-rendered every few seconds.
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null",
        f"#{scope} [data-figure='{name}'] dd")


def no_console_errors(driver, page):
    # Refused requests are logged by the browser as network errors, and the test makes
    # some on purpose; a script error is never expected.
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    check(not errors, f"{page}: no script error in the browser console ({errors[:3]})")


def screenshot(driver, out, name, size):
    driver.set_window_size(*size)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.4)
    # The whole page, not just the window: the window grows to the document's height.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size[0], max(size[1], min(height, 2400)))
    time.sleep(0.3)
    path = os.path.join(out, f"{name}.png")
    driver.save_screenshot(path)
    overflow = driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    if overflow > 0:
        wide = driver.execute_script("""
            const w = document.documentElement.clientWidth;
            return Array.from(document.querySelectorAll('body *'))
              .filter(e => e.getBoundingClientRect().right > w + 0.5)
              .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));""")
        print(f"  !!  wider than the screen: {wide}")
    check(overflow <= 0, f"{name}: nothing wider than the {size[0]} px screen (overflow {overflow} px)")
    driver.set_window_size(*size)
    print(f"  --  screenshot {path}")


def confirm(driver, expect_in_text):
    dialog = driver.find_element(By.ID, "confirm")
    wait(driver, lambda: dialog.get_attribute("open") is not None, "the confirmation dialog")
    said = text(driver, "confirm-text")
    check(all(part in said for part in expect_in_text), f"the confirmation says {expect_in_text}: {said!r}")
    driver.find_element(By.ID, "confirm-ok").click()
    wait(driver, lambda: dialog.get_attribute("open") is None, "the dialog to close")
    return said


# ---- the console ------------------------------------------------------------------------


def console(driver, svc, out):
    print("console")
    d = driver
    d.get(svc.base + "/console")
    check(visible(d, "sign-in") and not visible(d, "console"), "the console asks for the operator key first")
    d.find_element(By.ID, "admin-key").send_keys("not-the-key")
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
    wait(d, lambda: text(d, "sign-in-error") != "", "a refusal")
    check("wrong" in text(d, "sign-in-error"), f"a wrong key is refused in words: {text(d, 'sign-in-error')!r}")
    d.find_element(By.ID, "admin-key").clear()
    d.find_element(By.ID, "admin-key").send_keys(ADMIN_KEY)
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
    wait(d, lambda: visible(d, "console"), "the console after sign-in")
    stored = d.execute_script("return [sessionStorage.getItem('rpw.console.operatorKey'), localStorage.length, location.href, document.cookie]")
    check(stored[0] == ADMIN_KEY and stored[1] == 0 and ADMIN_KEY not in stored[2] and stored[3] == "",
          "the key is kept in sessionStorage only: not in localStorage, the URL or a cookie")

    # Create an activity: first with a bad id, whose message shows beside the id field.
    d.find_element(By.CSS_SELECTOR, "#create-activity summary").click()
    d.find_element(By.ID, "new-id").send_keys("Bad Id!")
    d.find_element(By.ID, "new-name").send_keys("Lantern festival")
    d.find_element(By.ID, "new-budget").send_keys("100000")
    d.find_element(By.ID, "new-cap").send_keys("500")
    d.find_element(By.CSS_SELECTOR, "#create-form button[type=submit]").click()
    id_error = d.find_element(By.CSS_SELECTOR, "#create-form .field-error[data-field='id']")
    wait(d, lambda: id_error.text != "", "the id's validation message")
    check("[a-z0-9-]" in id_error.text, f"the API's message is beside the id field: {id_error.text!r}")
    status, _ = svc.admin("GET", "/v1/admin/activities/bad-id")
    check(status == 404, "the refused activity was not created")
    # A missing cap: the message names the field.
    d.find_element(By.ID, "new-id").clear()
    d.find_element(By.ID, "new-id").send_keys("lantern")
    d.find_element(By.ID, "new-cap").clear()
    d.find_element(By.CSS_SELECTOR, "#create-form button[type=submit]").click()
    cap_error = d.find_element(By.CSS_SELECTOR, "#create-form .field-error[data-field='max_award_cents']")
    wait(d, lambda: cap_error.text != "", "the cap's validation message")
    check(id_error.text == "", f"the id's old message is gone; the cap's shows: {cap_error.text!r}")
    d.find_element(By.ID, "new-cap").send_keys("500")
    d.find_element(By.CSS_SELECTOR, "#create-form button[type=submit]").click()
    wait(d, lambda: visible(d, "activity-detail") and "lantern" in text(d, "detail-title"), "the new activity's detail")
    check(len(d.find_elements(By.CSS_SELECTOR, "#activity-list tr[data-activity='lantern']")) == 1, "the new activity is listed")
    status, view = svc.admin("GET", "/v1/admin/activities/lantern")
    check(status == 200 and view["budget_cents"] == 100000 and view["max_award_cents"] == 500, "the API has the activity as typed")

    # A scene and more budget.
    d.find_element(By.ID, "scene-id").send_keys("rain")
    d.find_element(By.ID, "scene-name").send_keys("Lantern rain")
    d.find_element(By.CSS_SELECTOR, "#scene-form button").click()
    wait(d, lambda: "rain" in text(d, "scene-list"), "the scene in the list")
    d.find_element(By.ID, "budget-delta").send_keys("50000")
    d.find_element(By.CSS_SELECTOR, "#budget-form button").click()
    wait(d, lambda: figure(d, "budget") == "¥1,500.00", "the budget figure to show the added budget")
    check(figure(d, "budget") == "¥1,500.00", "budget 100000 + 50000 cents shows as ¥1,500.00")

    # A burst of awards through the API: the figures and the chart follow it, and the
    # bounded worker (10 tokens/s) turns it into a backlog that drains.
    awards = [dict(user_id=42, app_id=1, activity_id="lantern", scene_id="rain", rain_id=i,
                   award_type="cash", amount_cents=10 + i) for i in range(60)]
    results = svc.award_batch(awards)
    tokens = [r["token"] for r in results if "token" in r]
    check(len(tokens) == 60, "60 awards issued through the API")
    issued_cents = sum(a["amount_cents"] for a in awards)
    wait(d, lambda: figure(d, "issued").startswith(f"¥{issued_cents / 100:,.2f}"), "the issued figure", timeout=15)
    check(figure(d, "issued") == f"¥{issued_cents / 100:,.2f} · 60", f"issued shows {figure(d, 'issued')!r}")
    wait(d, lambda: figure(d, "pending") != "¥0.00 · 0" and figure(d, "booked") != "¥0.00 · 0",
         "a backlog being booked (pending and booked both above zero)", timeout=20)
    print(f"  --  mid-drain: booked {figure(d, 'booked')!r}, pending {figure(d, 'pending')!r}")
    wait(d, lambda: len(d.find_element(By.CSS_SELECTOR, "polyline[data-series='issued']").get_attribute("points").split()) >= 3,
         "three samples in the chart", timeout=20)
    booked_points = d.find_element(By.CSS_SELECTOR, "polyline[data-series='booked']").get_attribute("points").split()
    ys = [float(p.split(",")[1]) for p in booked_points]
    check(len(set(ys)) > 1, "the booked line moves as the worker books")
    wait(d, lambda: figure(d, "pending") == "¥0.00 · 0", "the backlog to drain", timeout=30)
    screenshot(d, out, "console-desktop", DESKTOP)
    check(figure(d, "booked") == f"¥{issued_cents / 100:,.2f} · 60", "everything issued is booked")

    # Leak repair and in-doubt release: each confirmation states the amount.
    d.find_element(By.ID, "repair-leak").click()
    confirm(d, ["lantern", "¥"])
    wait(d, lambda: text(d, "action-result").startswith("Repaired"), "the repair's result")
    check("¥0.00" in text(d, "action-result"), f"nothing leaked, nothing repaired: {text(d, 'action-result')!r}")
    d.find_element(By.ID, "release-in-doubt").click()
    confirm(d, ["¥0.00 is in doubt"])
    wait(d, lambda: text(d, "action-result").startswith("Released"), "the release's result")

    # A switch: its effect is stated, the toggle confirms, the API agrees and acts on it.
    d.find_element(By.CSS_SELECTOR, ".tabs button[data-tab='switches']").click()
    row = "#switch-list tr[data-switch='issue_off']"
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, row), "the switches")
    check("503" in d.find_element(By.CSS_SELECTOR, f"{row} td:nth-child(2)").text, "the switch's documented effect is shown")
    d.find_element(By.CSS_SELECTOR, f"{row} button").click()
    confirm(d, ["issue_off", "ON"])
    wait(d, lambda: d.find_element(By.CSS_SELECTOR, f"{row} .state").text == "ON", "the switch to show ON")
    _, sw = svc.admin("GET", "/v1/admin/switches")
    check(any(s["name"] == "issue_off" and s["on"] for s in sw["switches"]), "the API says issue_off is on")
    status, body = svc.call("POST", "/v1/awards", dict(awards[0], rain_id=999), CALLER_KEY)
    check(status == 503 and body["error"]["code"] == "unavailable", "with issue_off on, an award is refused 503")
    d.find_element(By.CSS_SELECTOR, f"{row} button").click()
    confirm(d, ["issue_off", "off"])
    wait(d, lambda: d.find_element(By.CSS_SELECTOR, f"{row} .state").text == "off", "the switch to show off")
    _, sw = svc.admin("GET", "/v1/admin/switches")
    check(not any(s["name"] == "issue_off" and s["on"] for s in sw["switches"]), "the API says issue_off is off again")

    # A user flagged by a scene that is not open yet, for the console's list.
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    status, body = svc.admin("POST", "/v1/admin/activities/lantern/scenes",
                             {"id": "later", "name": "Later", "award_type": "cash", "guards": {"opens_at": later}})
    assert status == 201, (status, body)
    early = dict(user_id=777, app_id=1, activity_id="lantern", scene_id="later", rain_id=1,
                 award_type="cash", amount_cents=5)
    deadline = time.time() + 10
    while True:
        results = svc.award_batch([early])
        if results[0]["error"] and results[0]["error"]["code"] == "activity_closed":
            break
        assert time.time() < deadline, results
        time.sleep(0.3)

    # A coupon template with three coupons handed out, for the console's coupon list.
    status, body = svc.admin("POST", "/v1/admin/coupon-templates",
                             {"id": "tpl-lantern", "name": "Lantern 5 off", "face_value_cents": 500,
                              "min_spend_cents": 2000, "stock": 40, "valid_days": 7})
    assert status == 201, (status, body)
    status, body = svc.admin("POST", "/v1/admin/activities/lantern/scenes",
                             {"id": "coupons", "name": "Coupons", "award_type": "coupon",
                              "coupon": {"template_id": "tpl-lantern"}})
    assert status == 201, (status, body)
    deadline = time.time() + 10
    while True:
        results = svc.award_batch([dict(user_id=800 + i, app_id=1, activity_id="lantern", scene_id="coupons",
                                         rain_id=1, award_type="coupon") for i in range(3)])
        if all(r.get("error") is None for r in results):
            break
        assert time.time() < deadline, results
        time.sleep(0.3)

    # Health.
    d.find_element(By.CSS_SELECTOR, ".tabs button[data-tab='health']").click()
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#health-figures [data-figure='redis']"), "the health figures")
    check(figure(d, "redis", "health-figures") == "ok" and figure(d, "mysql", "health-figures") == "ok", "Redis and MySQL ok")
    check(figure(d, "bound", "health-figures") == "10 /s", "the booking bound is the configured 10 /s")
    wait(d, lambda: figure(d, "rate", "health-figures").endswith("/s"), "a measured booking rate", timeout=10)
    # Red packets and flagged users, as the API says them.
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#packet-figures [data-figure='packets']"), "the red packet figures")
    _, packets = svc.admin("GET", "/v1/admin/packets")
    check(figure(d, "packets", "packet-figures") == f"{packets['packets']:,}", "the console counts the packets the API sums")
    _, flagged = svc.admin("GET", "/v1/admin/flagged")
    rows = d.find_elements(By.CSS_SELECTOR, "#flagged-list tbody tr")
    check(len(rows) == len(flagged["users"]) == 1 and "777" in rows[0].text and "early" in rows[0].text
          and not visible(d, "flagged-empty"), "the console lists the user flagged early, as the API does")

    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#coupon-list tr[data-template='tpl-lantern']"), "the coupon template row")
    _, templates = svc.admin("GET", "/v1/admin/coupon-templates")
    api = next(t for t in templates["templates"] if t["id"] == "tpl-lantern")
    cells = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#coupon-list tr[data-template='tpl-lantern'] td")]
    check(cells[1:4] == ["40", f"{api['issued']:,}", f"{api['remaining']:,}"] and api["issued"] == 3
          and api["remaining"] == 37 and cells[7] == "yes" and not visible(d, "coupon-empty"),
          "the console shows the coupon template's stock, issued and remaining as the API does",
          seen=(cells, api))

    # Reconciliation: a report of the live activity, then a real mismatch (a ledger row
    # removed behind the service's back) highlighted.
    svc.cli("reconcile", "--activity", "lantern")
    d.find_element(By.CSS_SELECTOR, ".tabs button[data-tab='reconciliation']").click()
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#recon-list tr.ok"), "a reconciliation report")
    check(not d.find_elements(By.CSS_SELECTOR, "#recon-list tr.mismatch"), "the report is ok")
    svc.sql("DELETE FROM ledger_entries WHERE activity_id = 'lantern' AND kind = 'award' LIMIT 1")
    svc.cli("reconcile", "--activity", "lantern", ok=False)  # a mismatch: exit status 1
    d.find_element(By.CSS_SELECTOR, ".tabs button[data-tab='switches']").click()
    d.find_element(By.CSS_SELECTOR, ".tabs button[data-tab='reconciliation']").click()
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#recon-list tr.mismatch"), "the mismatch row")
    bad = d.find_element(By.CSS_SELECTOR, "#recon-list tr.mismatch")
    check("disagree" in bad.text, f"the mismatch is highlighted with its problem: {bad.text!r}")
    background = bad.value_of_css_property("background-color")
    check(background not in ("rgba(0, 0, 0, 0)", "transparent"), f"the mismatch row is coloured ({background})")
    d.find_element(By.ID, "recon-mismatch-only").click()
    wait(d, lambda: not d.find_elements(By.CSS_SELECTOR, "#recon-list tr.ok"), "the filter to hide ok reports")
    d.find_element(By.CSS_SELECTOR, ".tabs button[data-tab='activities']").click()
    screenshot(d, out, "console-phone", PHONE)
    no_console_errors(d, "console")
    d.find_element(By.ID, "sign-out").click()
    check(d.execute_script("return sessionStorage.getItem('rpw.console.operatorKey')") is None, "sign-out forgets the key")
    return tokens


# ---- the wallet ---------------------------------------------------------------------------


def wallet(driver, svc, out, tokens):
    print("wallet")
    d = driver
    # The console's mismatch test removed one ledger row of user 42: the wallet is
    # tested with a fresh activity and user.
    svc.admin("POST", "/v1/admin/activities", dict(
        id="spring", name="Spring rain", stage="live", starts_at="2020-01-01T00:00:00Z",
        ends_at="2099-01-01T00:00:00Z", budget_cents=1_000_000, max_award_cents=1000))
    svc.admin("POST", "/v1/admin/activities/spring/scenes", dict(id="rain", name="Rain", award_type="cash"))
    user = 7001
    awards = [dict(user_id=user, app_id=1, activity_id="spring", scene_id="rain", rain_id=i,
                   award_type="cash", amount_cents=100 + i) for i in range(30)]
    # Pause booking so some awards are still pending on the page.
    svc.admin("PUT", "/v1/admin/switches/booking_paused", {"on": True})
    results = svc.award_batch(awards)
    user_tokens = [r["token"] for r in results]
    check(len(user_tokens) == 30, "30 awards for the wallet's user")
    jwt = svc.cli("dev-jwt", str(user))

    d.get(svc.base + "/wallet")
    check(visible(d, "sign-in"), "the wallet asks for a user token")
    d.find_element(By.ID, "jwt").send_keys("not.a.jwt")
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
    wait(d, lambda: text(d, "sign-in-error") != "", "a refusal")
    check(text(d, "sign-in-error") != "", f"a bad token is refused in words: {text(d, 'sign-in-error')!r}")
    d.find_element(By.ID, "jwt").clear()
    d.find_element(By.ID, "jwt").send_keys(jwt)
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
    wait(d, lambda: visible(d, "wallet") and text(d, "balance") != "–", "the balance")
    _, w = svc.call("GET", "/v1/wallet", bearer=jwt)
    total = sum(a["amount_cents"] for a in awards)
    check(w["balance_cents"] == total and text(d, "balance") == f"¥{total / 100:,.2f}",
          f"the balance is every cent at once: {text(d, 'balance')!r}")
    check(figure(d, "pending", "wallet-figures") == f"¥{total / 100:,.2f} (30)", "all 30 pending, shown as such")

    # Flows: 20 a page, pending marked, the next page on request.
    wait(d, lambda: len(d.find_elements(By.CSS_SELECTOR, "#flows li")) == 20, "the first page of flows")
    check(len(d.find_elements(By.CSS_SELECTOR, "#flows li .badge")) == 20, "pending items are marked")
    check(visible(d, "flows-more"), "there is an older page")
    d.find_element(By.ID, "flows-more").click()
    wait(d, lambda: len(d.find_elements(By.CSS_SELECTOR, "#flows li")) == 30, "the second page")
    otns = [li.get_attribute("data-otn") for li in d.find_elements(By.CSS_SELECTOR, "#flows li")]
    check(len(set(otns)) == 30, "30 distinct flows over two pages")
    check(not visible(d, "flows-more"), "no page after the last")
    screenshot(d, out, "wallet-phone", PHONE)

    # Withdraw, double-clicked: one withdrawal, the forced settlement and new balance shown.
    d.find_element(By.ID, "withdraw-amount").send_keys("5.20")
    ActionChains(d).double_click(d.find_element(By.ID, "withdraw-submit")).perform()
    wait(d, lambda: text(d, "withdraw-result") != "", "the withdrawal's result")
    said = text(d, "withdraw-result")
    check("¥5.20" in said and "30 pending awards booked first" in said and f"¥{(total - 520) / 100:,.2f}" in said,
          f"the result states the amount, the forced settlement and the new balance: {said!r}")
    time.sleep(1.0)
    _, flows = svc.call("GET", "/v1/wallet/flows?limit=100", bearer=jwt)
    withdrawals = [f for f in flows["items"] if f["kind"] == "withdraw"]
    check(len(withdrawals) == 1 and withdrawals[0]["amount_cents"] == -520, "a double click withdrew once")
    wait(d, lambda: text(d, "balance") == f"¥{(total - 520) / 100:,.2f}", "the new balance")
    wait(d, lambda: len(d.find_elements(By.CSS_SELECTOR, "#flows li .badge")) == 0, "nothing pending after the withdraw")

    # An error in words, from the API's code.
    d.find_element(By.ID, "withdraw-amount").send_keys("100000")
    d.find_element(By.ID, "withdraw-submit").click()
    wait(d, lambda: text(d, "withdraw-error") != "", "the error")
    check("balance is lower than the amount" in text(d, "withdraw-error"), f"insufficient balance in words: {text(d, 'withdraw-error')!r}")

    # The tokens this device keeps: kept, synced, one altered token rejected.
    altered = bytearray(base64.urlsafe_b64decode(user_tokens[0] + "=="))
    altered[-40] ^= 1  # a byte of the signature / proof, not of the payload
    altered = base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("=")
    d.find_element(By.ID, "token-input").send_keys("\n".join(user_tokens[:10] + [altered]))
    d.find_element(By.ID, "token-add").click()
    wait(d, lambda: text(d, "token-count") == "11", "11 tokens kept")
    d.refresh()
    wait(d, lambda: visible(d, "wallet") and text(d, "token-count") == "11", "the tokens are still kept after a reload")
    d.find_element(By.ID, "token-sync").click()
    wait(d, lambda: text(d, "sync-result").startswith("Synced"), "the sync's result")
    said = text(d, "sync-result")
    check("0 restored" in said and "10 already known" in said and "1 rejected" in said, f"sync: {said!r}")
    screenshot(d, out, "wallet-desktop", DESKTOP)
    no_console_errors(d, "wallet")
    svc.admin("PUT", "/v1/admin/switches/booking_paused", {"on": False})


def command_line(svc):
    """The long commands report progress on stderr: plain lines when it is not a
    terminal (here, a pipe)."""
    print("command line")
    out = subprocess.run([svc.binary, "settle", "--all"], env=svc.env, capture_output=True, text=True, timeout=120)
    check(out.returncode == 0, f"settle --all succeeds ({out.stderr[-300:]!r})")
    lines = [l for l in out.stderr.splitlines() if l.startswith("settle: ")]
    check(lines and "8 partitions swept" in lines[-1] and "\r" not in out.stderr and "\x1b" not in out.stderr,
          f"settle --all ends with a plain progress line: {lines[-1:]!r}")
    check("booked" in out.stdout, f"and prints its result: {out.stdout.strip()!r}")
    out = subprocess.run([svc.binary, "reconcile"], env=svc.env, capture_output=True, text=True, timeout=120)
    reports = json.loads(out.stdout)
    activities = sorted(r["activity_id"] for r in reports)
    check(activities == ["lantern", "spring", "tpl-lantern"],
          f"reconcile without --activity covers every activity and coupon template of the hour: {activities}")
    check(out.returncode == 3, "and exits 3, since lantern has a mismatch")
    check(any(l.startswith("reconcile: hour ") and "3 activities, 1 with a mismatch" in l for l in out.stderr.splitlines()),
          f"with its progress line: {out.stderr.strip().splitlines()[-1:]!r}")


def webhook_after_kill9(svc):
    """A `serve` killed (SIGKILL) while it is sending a webhook: after its lease runs
    out, the restarted service sends the same event again (at least once; the receiver
    dedupes by its id), and records it delivered."""
    import http.server
    import threading
    print("webhook across kill -9")
    got = []
    first_arrived = threading.Event()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(json.loads(body))
            if len(got) == 1:
                first_arrived.set()
                time.sleep(8)  # the sender is killed meanwhile
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    status, hook = svc.admin("POST", "/v1/admin/webhooks", {
        "url": url, "events": ["withdrawal.submitted"], "secret": "kill-nine-secret-0123"})
    check(status == 201, f"subscribed: {hook}")
    jwt = svc.cli("dev-jwt", "7001")
    status, w = svc.call("POST", "/v1/withdrawals", {"request_id": "kill9", "amount_cents": 1}, jwt)
    check(status == 201, f"a withdrawal: {w}")
    check(first_arrived.wait(20), "the first delivery attempt reached the receiver")
    svc.kill9()
    check(len(got) == 1, "killed while the receiver held the first attempt")
    svc.start(migrate=False)
    deadline = time.time() + 30
    while time.time() < deadline and len(got) < 2:
        time.sleep(0.2)
    check(len(got) >= 2, f"the event was sent again after the lease ({len(got)} attempts)")
    check(all(g["id"] == got[0]["id"] for g in got) and got[0]["data"]["withdrawal_id"] == w["withdrawal_id"],
          "the same event id every time: the receiver dedupes by it")
    deliveries = []
    for _ in range(50):
        _, body = svc.admin("GET", f"/v1/admin/webhooks/{hook['id']}/deliveries")
        deliveries = body["deliveries"]
        if deliveries and deliveries[0]["state"] == "delivered":
            break
        time.sleep(0.2)
    check(len(deliveries) == 1 and deliveries[0]["state"] == "delivered",
          f"recorded delivered once: {deliveries}")
    server.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/debug/redpacket-wallet")
    ap.add_argument("--out", default=".data/screenshots")
    ap.add_argument("--redis", default=os.environ.get("RPW_TEST_REDIS_URL", "redis://127.0.0.1:6379"))
    ap.add_argument("--mysql", default=os.environ.get("RPW_TEST_MYSQL_URL", "mysql://rpw:rpw@127.0.0.1:3306/rpw"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="rpw-browser-")
    svc = Service_(os.path.abspath(args.bin), args.redis, args.mysql, workdir)
    driver = None
    try:
        svc.start()
        driver = browser()
        tokens = console(driver, svc, args.out)
        wallet(driver, svc, args.out, tokens)
        command_line(svc)
        webhook_after_kill9(svc)
        print(f"pages: {checks} checks passed")
    except Exception:
        if driver is not None:
            try:
                driver.save_screenshot(os.path.join(args.out, "failure.png"))
                print("browser console:", driver.get_log("browser")[-10:], file=sys.stderr)
            except Exception:
                pass
        print(f"service log: {os.path.join(workdir, 'serve.log')}", file=sys.stderr)
        raise
    finally:
        if driver is not None:
            driver.quit()
        svc.stop()
        svc.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
