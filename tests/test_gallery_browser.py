"""The gallery in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by Selenium, opening the page from disk (file://).

Without Chromium these tests skip with the reason, except when FGCLI_REQUIRE_BROWSER=1
(.ci/run sets it): then a missing browser fails them. A failing test saves a screenshot
to test-screenshots/ (or $FGCLI_SCREENSHOTS) and prints its path and the browser console.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from gallery_util import ODD, cli, manifest, real_tree, synthetic_tree
from helpers import ROOT

SCREENSHOTS = Path(os.environ.get("FGCLI_SCREENSHOTS", ROOT / "test-screenshots"))
REQUIRED = os.environ.get("FGCLI_REQUIRE_BROWSER") == "1"
pytestmark = pytest.mark.slow  # a real browser: the full tier


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium on PATH (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver():
    reason = _missing()
    if reason:
        if REQUIRED:
            pytest.fail(f"FGCLI_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-gpu"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield browser
    browser.quit()


@pytest.fixture()
def page(driver, request):
    """The browser, with a screenshot and the console printed when the test fails."""
    driver.get_log("browser")  # drop what earlier tests left
    yield driver
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / f"{request.node.name}.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        for entry in driver.get_log("browser"):
            print(f"console {entry['level']}: {entry['message']}")


def open_gallery(driver, tree: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get((tree / "index.html").resolve().as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def wait(driver, condition, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition())


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def card_keys(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.card')).map(c => c.dataset.key)")


def thumbs_loaded(driver) -> bool:
    return driver.execute_script(
        "const i = Array.from(document.querySelectorAll('.card img'));"
        "return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0);")


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def open_card(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    card = next(c for c in driver.find_elements(By.CSS_SELECTOR, ".card")
                if c.get_attribute("data-key") == key)
    card.click()
    wait(driver, lambda: driver.find_element(By.ID, "detail").is_displayed())


# ---------------------------------------------------------------------------- trees
@pytest.fixture(scope="module")
def photos_tree(tmp_path_factory) -> Path:
    """The acceptance run: the six example photos, --gallery, decompositions saved."""
    from helpers import SQUEEZENET_WEIGHTS

    out = tmp_path_factory.mktemp("photos") / "fullgrad-out"
    result = cli("dump", str(ROOT / "examples" / "photos"), "-m", "squeezenet1_1",
                 "--weights", str(SQUEEZENET_WEIGHTS), "--size", "96", "--workers", "0",
                 "--save", "heatmap,overlay,decomp", "--out", str(out), "--gallery", "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def topk_tree(tmp_path_factory) -> Path:
    """Odd file names, a broken file, --topk 2, and an eval result in the tree."""
    out, result = real_tree(tmp_path_factory.mktemp("topk"), "--topk", "2", "-q")
    assert result.exit_code == 1, result.output  # the broken file
    docs = ROOT / "docs"
    shutil.copy(docs / "eval-squeezenet1_1-examples.json", out / "eval.json")
    shutil.copy(docs / "eval-squeezenet1_1-examples.png", out / "eval.png")
    assert cli("gallery", str(out), "-q").exit_code == 0
    return out


@pytest.fixture(scope="module")
def big_tree(topk_tree, tmp_path_factory) -> Path:
    tree = synthetic_tree(topk_tree, tmp_path_factory.mktemp("big") / "out", 260)
    assert cli("gallery", str(tree), "-q").exit_code == 0
    return tree


# ---------------------------------------------------------------------------- tests
def test_acceptance_six_photos_with_classes_residuals_and_decomposition(page, photos_tree):
    from selenium.webdriver.common.by import By

    open_gallery(page, photos_tree)
    recs = {r["key"]: r for r in manifest(photos_tree)}
    assert sorted(card_keys(page)) == sorted(recs) and len(recs) == 6
    wait(page, lambda: thumbs_loaded(page))
    for card in page.find_elements(By.CSS_SELECTOR, ".card"):
        rec = recs[card.get_attribute("data-key")]
        text = card.text
        assert rec["target_name"] in text and "r=" in text, text
    open_card(page, "chelsea.png")
    chart = wait(page, lambda: page.find_elements(By.ID, "decomp-chart"))[0]
    layers = len(__import__("numpy").load(photos_tree / recs["chelsea.png"]["outputs"]
                                          ["decomp"])["layers"])
    bars = chart.find_elements(By.CSS_SELECTOR, "rect.bar")
    assert len(bars) == layers + 3  # input, every layer, residual, the logit
    total = float(chart.get_attribute("data-sum"))
    logit = float(chart.get_attribute("data-logit"))
    assert logit == pytest.approx(recs["chelsea.png"]["logit"], rel=1e-9)
    assert total == pytest.approx(logit, rel=1e-5)
    terms = [float(b.get_attribute("data-value")) for b in bars[:-1]]
    assert sum(terms) == pytest.approx(logit, rel=1e-5)
    record = json.loads(page.find_element(By.ID, "detail-record").text)
    assert record == recs["chelsea.png"]
    wait(page, lambda: page.execute_script(
        "const i = Array.from(document.querySelectorAll('#detail-body figure.full img'));"
        "return i.length === 3 && i.every(x => x.complete && x.naturalWidth > 0);"))
    assert console_errors(page) == []


def test_sorting_filtering_search_and_pages_change_the_grid(page, big_tree):
    from selenium.webdriver.common.by import By

    open_gallery(page, big_tree)
    recs = manifest(big_tree)
    keys = sorted(r["key"] for r in recs)
    assert card_keys(page) == keys[:100]  # path order, one page of 100 cards
    page.find_element(By.CSS_SELECTOR, "#pager-top .next").click()
    wait(page, lambda: card_keys(page) == keys[100:200])

    choose(page, "sort", "prob")
    page.find_element(By.ID, "descending").click()
    ok = [r for r in recs if r["status"] == "ok"]
    by_prob = [r["key"] for r in sorted(ok, key=lambda r: -r["prob"])]
    wait(page, lambda: card_keys(page)[:5] == by_prob[:5])

    choose(page, "sort", "residual")
    by_res = [r["key"] for r in sorted(ok, key=lambda r: -abs(r["residual"]))]
    wait(page, lambda: card_keys(page)[:5] == by_res[:5])

    name = ok[0]["target_name"]
    index = page.execute_script(
        "return Array.from(document.querySelectorAll('#class-filter option'))"
        ".find(o => o.textContent.startsWith(arguments[0] + ' (')).value", name)
    choose(page, "class-filter", index)
    want = {r["key"] for r in ok if r["target_name"] == name}
    wait(page, lambda: set(card_keys(page)) == want)
    assert page.find_element(By.ID, "status-line").text == (
        f"{len(want)} of {len(recs)} images match")
    choose(page, "class-filter", "")

    choose(page, "status-filter", "failed")
    failed = {r["key"] for r in recs if r["status"] == "failed"}
    wait(page, lambda: set(card_keys(page)) == failed)
    assert all("corrupt image: synthetic" in c.text
               for c in page.find_elements(By.CSS_SELECTOR, ".card"))
    choose(page, "status-filter", "")

    box = page.find_element(By.ID, "search")
    box.send_keys("set3/img_000")
    want = {r["key"] for r in recs if "set3/img_000" in r["key"]}
    wait(page, lambda: set(card_keys(page)) == want)
    box.clear()
    box.send_keys("no such image")
    wait(page, lambda: card_keys(page) == [])
    assert "No image matches" in page.find_element(By.ID, "grid").text
    assert console_errors(page) == []


def test_topk_side_by_side_odd_names_failures_and_eval(page, topk_tree):
    from selenium.webdriver.common.by import By

    open_gallery(page, topk_tree)
    wait(page, lambda: thumbs_loaded(page))
    cards = {c.get_attribute("data-key"): c
             for c in page.find_elements(By.CSS_SELECTOR, ".card")}
    assert len(cards) == 8
    odd = cards[ODD]
    assert odd.find_element(By.CSS_SELECTOR, ".key").text == ODD  # shown, not parsed
    assert odd.find_elements(By.TAG_NAME, "b") == []
    assert len(odd.find_elements(By.CSS_SELECTOR, ".thumb img")) == 2  # both ranks
    assert "not an image Pillow can read" in cards["broken.jpg"].text

    recs = [r for r in manifest(topk_tree) if r["key"] == ODD]
    open_card(page, ODD)
    side = page.find_elements(By.CSS_SELECTOR, "#detail-body .side-by-side figure")
    assert len(side) == 2
    ranks = page.find_elements(By.CSS_SELECTOR, "#detail-body .ranks button")
    ranks[1].click()
    second = next(r for r in recs if r["rank"] == 2)
    wait(page, lambda: page.find_elements(By.ID, "detail-record") and json.loads(
        page.find_element(By.ID, "detail-record").text or "{}").get("rank") == 2)
    overlay = page.execute_script(
        "return Array.from(document.querySelectorAll('#detail-body .images img'))"
        ".map(i => decodeURIComponent(new URL(i.src).pathname))")
    assert any(p.endswith(second["outputs"]["overlay"]) for p in overlay)
    wait(page, lambda: page.execute_script(
        "return Array.from(document.querySelectorAll('#detail-body img'))"
        ".every(x => x.complete && x.naturalWidth > 0)"))
    page.find_element(By.ID, "detail-close").click()
    wait(page, lambda: not page.find_element(By.ID, "detail").is_displayed())

    table = page.find_element(By.CSS_SELECTOR, "#eval-table table")
    methods = json.loads((topk_tree / "eval.json").read_text())["results"]
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.find_element(By.TAG_NAME, "th").text for r in rows] == list(methods)
    plot = page.find_element(By.CSS_SELECTOR, "#eval-table img")
    wait(page, lambda: plot.get_property("naturalWidth") > 0)
    assert console_errors(page) == []


def test_detail_views_in_quick_succession_load_each_records_file_once(page, big_tree):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_gallery(page, big_tree)
    keys = card_keys(page)
    page.execute_script(  # a click and 15 presses within one task: before any script loads
        "document.querySelector('.card').click();"
        "for (let i = 0; i < 15; i++)"
        "  document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight'}));")
    wait(page, lambda: page.find_element(By.ID, "detail-title").text == keys[15])
    wait(page, lambda: json.loads(page.find_element(By.ID, "detail-record").text
                                  .replace("loading…", "{}") or "{}").get("key") == keys[15])
    scripts = page.execute_script(
        "return Array.from(document.querySelectorAll('script[src^=\"gallery/records/\"]'))"
        ".map(s => s.getAttribute('src'))")
    assert len(scripts) == len(set(scripts)) == 1  # the first 16 images share a chunk
    page.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait(page, lambda: not page.find_element(By.ID, "detail").is_displayed())
    assert console_errors(page) == []


def test_without_decomp_the_detail_view_says_how_to_get_the_chart(page, tmp_path):
    from selenium.webdriver.common.by import By

    out, _ = real_tree(tmp_path, "--save", "heatmap,overlay", "--gallery", "-q")
    open_gallery(page, out)
    open_card(page, "coffee.png")
    chart = page.find_element(By.ID, "detail-chart")
    wait(page, lambda: "--save" in chart.text)
    assert "No decomp/ file for this map" in chart.text
    assert page.find_elements(By.ID, "decomp-chart") == []
    assert console_errors(page) == []
