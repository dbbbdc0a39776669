"""The live page in a real headless browser (Debian's chromium + chromedriver, through Selenium),
against a real in-process daemon with packets flowing: the page loads with its vendored charts, the
charts move, the configuration is shown without secrets, and a stopped target shows as down.

``GOLCONDE_LIVE_PAGE_PNG=docs/live-page.png`` also saves the screenshot taken while packets flow
there (it is always saved in the test's tmp_path).
"""
from __future__ import annotations

import os
import shutil
import time

import pytest

from golconde.daemon import Daemon

from .flow_support import execute, make_config, parse_config, wait_for
from .operators_support import ITEMS, SECRET, Pump, free_port

CHROMIUM = os.environ.get("GOLCONDE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GOLCONDE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")



@pytest.fixture
def browser(tmp_path):
    """A Selenium Chrome driver on Debian's chromium with a fresh profile (never downloads one)."""
    from selenium import webdriver               # the [test] extra
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail("%s not found: install Debian's chromium and chromium-driver "
                        "(scripts/setup-services.sh does)" % path)
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument("--user-data-dir=%s" % (tmp_path / "chromium-profile"))
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def live(make_database):
    """A daemon (one destination, targets t1 and t2, HTTP on a free port) and a packet pump.
    The target DSNs carry a password (ignored by trust authentication) that must never show."""
    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, ITEMS)
    port = free_port()
    mapping = make_config(canonical, {"t1": t1 + " password=" + SECRET, "t2": t2}, "public.items",
                          name="Items%s" % os.urandom(3).hex(), http_port=port,
                          settings={"api_key": SECRET})
    config = parse_config(mapping)
    daemon = Daemon(config)
    daemon.start()
    destination = config.destinations[0]
    pump = Pump(destination.queue, rate=80.0, limit=120.0)
    yield {"daemon": daemon, "port": port, "destination": destination, "pump": pump}
    if pump.is_alive():
        pump.stop()
    assert daemon.stop(), "daemon did not stop in time"


def card_state(driver, thread):
    return driver.execute_script(
        "var c = document.querySelector('article.listener[data-thread=\"' + arguments[0] + '\"]');"
        "return c ? [c.getAttribute('data-state'), c.querySelector('.badge.state').textContent] : null;",
        thread)


def series_sum(driver, thread, chart):
    """Sum of every non-null value of every data series (not x) of a card's uPlot chart."""
    return driver.execute_script(
        "var card = window.golconde.cards[arguments[0]]; if (!card) { return null; }"
        "var data = card[arguments[1]].data, sum = 0;"
        "for (var s = 1; s < data.length; s++) { data[s].forEach(function (v) { if (v) { sum += v; } }); }"
        "return sum;", thread, chart)


def canvas_image(driver, thread):
    return driver.execute_script(
        "return window.golconde.cards[arguments[0]].rates.ctx.canvas.toDataURL();", thread)


def test_live_page_charts_move_and_a_stopped_target_shows_down(browser, live, tmp_path):
    destination, port, daemon = live["destination"], live["port"], live["daemon"]
    name = destination.name
    threads = [name] + [target.thread_name for target in destination.targets]
    browser.get("http://127.0.0.1:%d/" % port)
    assert "Realtime Activity" in browser.title

    # every listener gets a card, up, with the vendored uPlot charts drawn (3 canvases per card)
    wait_for(lambda: all((card_state(browser, t) or [None])[0] == "up" for t in threads),
             timeout=60, message="every listener card up")
    assert browser.execute_script("return typeof uPlot") == "function"
    assert len(browser.find_elements("css selector", "article.listener canvas")) >= 3 * len(threads)
    assert [e.get_attribute("data-thread") for e in
            browser.find_elements("css selector", "article.listener")][0] == name

    # packets flow: the rate charts of the destination and of each target go above zero and the
    # drawn image changes from one second to the next
    pump = live["pump"]
    pump.start()
    for thread in threads:
        wait_for(lambda: (series_sum(browser, thread, "rates") or 0) > 0, timeout=60,
                 message="packets/s chart of %s above zero" % thread)
    before = canvas_image(browser, threads[1])
    polls = browser.execute_script("return window.golconde.polls")
    time.sleep(2.5)
    assert browser.execute_script("return window.golconde.polls") >= polls + 2, "polls every second"
    assert canvas_image(browser, threads[1]) != before, "the chart did not move"
    assert pump.error is None, pump.error

    # the configuration is shown, without secrets
    text = browser.find_element("css selector", "body").get_attribute("textContent")
    assert destination.queue in text and "public.items" in text
    assert SECRET not in text and SECRET not in browser.page_source
    assert browser.find_element("id", "health").text == "healthy"
    # each card's figures, the unmatched count among them (what /stats says)
    figures = browser.execute_script(
        "return Array.from(document.querySelectorAll('article.listener[data-thread=\"%s\"] .figures div'))"
        ".map(function (d) { return d.textContent; })" % threads[1])
    unmatched = [f for f in figures if f.startswith("unmatched")]
    assert unmatched == ["unmatched%d" % daemon.registry.get(threads[1]).snapshot()["unmatched"]], figures

    # screenshot while packets flow (after some history), of the whole page
    wait_for(lambda: browser.execute_script("return window.golconde.polls") >= polls + 15,
             timeout=30, message="15 more polls")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1400, "height": min(max(height, 700), 2400), "deviceScaleFactor": 1,
        "mobile": False})
    time.sleep(1.2)
    shot = tmp_path / "live-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10000
    if os.environ.get("GOLCONDE_LIVE_PAGE_PNG"):
        shutil.copyfile(shot, os.environ["GOLCONDE_LIVE_PAGE_PNG"])

    # a stopped target shows as down, and the page's health turns unhealthy
    stopped = destination.targets[1].thread_name
    daemon.listeners[stopped].stop()
    daemon.listeners[stopped].join(10)
    wait_for(lambda: card_state(browser, stopped) == ["down", "DOWN"], timeout=20,
             message="stopped target shown as down")
    assert card_state(browser, threads[1])[0] == "up"
    wait_for(lambda: browser.find_element("id", "health").text == "unhealthy", timeout=10,
             message="health badge unhealthy")
    assert stopped in browser.find_element("id", "health-reasons").text
    pump.stop()
    assert pump.error is None, pump.error


def test_page_works_offline_every_asset_from_the_daemon(browser, live):
    """Only the daemon's own origin is used: the page's resource timing lists nothing else, and
    the browser's console has no errors (CSP violations, failed loads)."""
    port = live["port"]
    browser.get("http://127.0.0.1:%d/" % port)
    wait_for(lambda: browser.execute_script("return window.golconde && window.golconde.polls") >= 2,
             timeout=30, message="two polls")
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(function (e) { return e.name; })")
    assert urls and all(url.startswith("http://127.0.0.1:%d/" % port) for url in urls), urls
    assert any(url.endswith("/vendor/uPlot.iife.min.js") for url in urls)
    # /health answers 503 until every listener is connected: the browser logs that as a failed load
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
              and "/health - Failed to load resource" not in entry["message"]]
    assert severe == []
