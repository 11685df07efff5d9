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
from urllib.parse import quote, unquote

import pytest
from gallery_util import (
    ODD,
    STATS,
    add_audit,
    cli,
    manifest,
    page_data,
    real_tree,
    synthetic_tree,
    write_report,
)
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


# a key that needs every kind of escaping in a link: spaces, non-ASCII, '#', '&', '='
UNICODE = "ünï cödé/日本 #1&rank=2 100%.png"


@pytest.fixture(scope="module")
def audit_tree(topk_tree, tmp_path_factory) -> Path:
    """The --topk 2 tree with one more key (UNICODE, chelsea's maps), statistics and
    pointing-game fields in its records, and a report/report.json."""
    tree = tmp_path_factory.mktemp("audit") / "out"
    shutil.copytree(topk_tree, tree)
    recs = manifest(tree)
    recs += [dict(r, key=UNICODE) for r in recs if r["key"] == "chelsea.png"]
    (tree / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    add_audit(tree)
    write_report(tree, gap=2, label=3)  # as `fullgrad report` draws it: labels below tiles
    assert cli("gallery", str(tree), "-q").exit_code == 0
    return tree


@pytest.fixture(scope="module")
def big_audit_tree(topk_tree, tmp_path_factory) -> Path:
    """260 images; every 5th ok record without statistics (as from an older dump)."""
    tree = synthetic_tree(topk_tree, tmp_path_factory.mktemp("bigaudit") / "out", 260)
    add_audit(tree, without=5)
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
    # records without statistics (an older dump): no statistic to sort or filter by
    assert not page.find_element(By.ID, "range-controls").is_displayed()
    assert not page.find_element(By.ID, "pointing-label").is_displayed()
    assert page.execute_script("return Array.from(document.querySelectorAll('#sort option'))"
                               ".map(o => o.value)") == ["path", "prob", "residual", "class"]
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


def _top_values(tree: Path, pick) -> tuple[list[str], dict[str, object]]:
    """The page's image order (data.js) and pick(the top map's audit array) per key
    (None without one)."""
    data = page_data(tree)
    values = {}
    for row in data["images"]:
        audit = row[4][0][9] if row[4] and len(row[4][0]) > 9 else None
        values[row[0]] = pick(audit) if audit else None
    return [row[0] for row in data["images"]], values


def test_sorting_and_range_filters_by_a_statistic(page, big_audit_tree):
    from selenium.webdriver.common.by import By

    border = STATS.index("border")
    order, values = _top_values(big_audit_tree, lambda a: a[border])
    assert sum(v is None for v in values.values()) > 40  # older records and failures
    open_gallery(page, big_audit_tree)
    page.execute_script("const s = document.getElementById('page-size');"
                        "s.value = '500'; s.dispatchEvent(new Event('change'));")
    choose(page, "sort", f"stat:{border}")
    rank = {k: i for i, k in enumerate(order)}
    known = [k for k in order if values[k] is not None]
    ascending = sorted(known, key=lambda k: (values[k], rank[k]))
    unknown = [k for k in order if values[k] is None]  # last, in path order
    wait(page, lambda: card_keys(page) == ascending + unknown)
    page.find_element(By.ID, "descending").click()
    descending = sorted(known, key=lambda k: (-values[k], rank[k]))
    wait(page, lambda: card_keys(page) == descending + unknown)
    first = page.find_element(By.CSS_SELECTOR, ".card .metric").text
    assert first.startswith("border ") and float(first[7:]) == values[descending[0]]

    choose(page, "range-stat", f"stat:{border}")
    page.find_element(By.ID, "range-min").send_keys("0.1")
    page.find_element(By.ID, "range-max").send_keys("0.3")
    want = [k for k in descending if 0.1 <= values[k] <= 0.3]
    assert 0 < len(want) < len(known)
    wait(page, lambda: card_keys(page) == want)
    assert page.find_element(By.ID, "status-line").text == (
        f"{len(want)} of {len(order)} images match")

    # composes with the other filters: a path search, then the pointing game
    page.find_element(By.ID, "search").send_keys("set2/")
    wait(page, lambda: card_keys(page) == [k for k in want if "set2/" in k])
    page.find_element(By.ID, "search").clear()
    _, hits = _top_values(big_audit_tree, lambda a: a[8] if len(a) > 8 else None)
    choose(page, "pointing-filter", "miss")
    wait(page, lambda: card_keys(page) == [k for k in want if hits[k] == 0])
    choose(page, "pointing-filter", "none")
    wait(page, lambda: card_keys(page) == [k for k in want if hits[k] is None])
    choose(page, "range-stat", "")
    choose(page, "pointing-filter", "absent")
    wait(page, lambda: set(card_keys(page)) == {k for k in order if hits[k] == -1})
    choose(page, "pointing-filter", "")
    choose(page, "sort", "hit")  # descending: hits, misses, absent, then none
    expect = sorted((k for k in order if hits[k] is not None), key=lambda k: (-hits[k], rank[k]))
    wait(page, lambda: card_keys(page) == expect + [k for k in order if hits[k] is None])
    assert console_errors(page) == []


def test_deep_links_open_the_detail_view_and_follow_hash_changes(page, audit_tree):
    from selenium.webdriver.common.by import By

    recs = manifest(audit_tree)
    index = audit_tree / "index.html"

    def record() -> dict:
        return json.loads(page.find_element(By.ID, "detail-record").text
                          .replace("loading…", "{}") or "{}")

    def shows(key: str, rank: int) -> bool:
        return (page.find_element(By.ID, "detail").is_displayed()
                and page.find_element(By.ID, "detail-title").text == key
                and record().get("key") == key and record().get("rank") == rank)

    for key in (ODD, UNICODE, "chelsea.png"):  # Python's quoting, as `fullgrad report` links
        page.get(index.resolve().as_uri() + "#image=" + quote(key, safe=""))
        page.refresh()  # a load, not only a hash change
        wait(page, lambda k=key: shows(k, 1))
        assert not page.find_element(By.ID, "notice").is_displayed()
    page.get(index.resolve().as_uri() + "#image=missing%20%231.png")  # on load
    page.refresh()
    wait(page, lambda: page.execute_script("return document.body.dataset.ready === '1'"))
    notice = page.find_element(By.ID, "notice")
    assert notice.is_displayed() and '"missing #1.png"' in notice.text
    assert not page.find_element(By.ID, "detail").is_displayed()
    assert len(card_keys(page)) == len({r["key"] for r in recs})  # the page works
    page.get(index.resolve().as_uri() + "#image=" + quote(UNICODE, safe="") + "&rank=2")
    page.refresh()
    wait(page, lambda: shows(UNICODE, 2))
    want = next(r for r in recs if r["key"] == UNICODE and r["rank"] == 2)
    cell = page.find_element(By.CSS_SELECTOR, '#detail-audit tr[data-field="border"] td')
    assert cell.text == str(want["stats"]["border"])

    # a hash change (a pasted link, the JavaScript way of writing it) opens another image,
    # also one the filters hide (they are cleared)
    page.find_element(By.ID, "detail-close").click()
    page.find_element(By.ID, "search").send_keys("no such image")
    wait(page, lambda: card_keys(page) == [])
    page.execute_script("location.hash = 'image=' + encodeURIComponent(arguments[0])", ODD)
    wait(page, lambda: shows(ODD, 1))
    assert page.find_element(By.ID, "search").get_attribute("value") == ""
    page.find_element(By.ID, "detail-next").click()  # ← → move through the whole gallery
    wait(page, lambda: page.find_element(By.ID, "detail-title").text != ODD)
    page.find_element(By.ID, "detail-prev").click()
    wait(page, lambda: shows(ODD, 1))
    page.execute_script("location.hash = 'image=no%20such.png'")
    wait(page, lambda: page.find_element(By.ID, "notice").is_displayed())
    assert not page.find_element(By.ID, "detail").is_displayed()
    assert '"no such.png"' in page.find_element(By.ID, "notice").text
    page.execute_script("location.hash = 'image=%E0%A4%A'")  # a malformed escape
    wait(page, lambda: "malformed" in page.find_element(By.ID, "notice").text)

    # opening a card writes the link; ← → and a rank rewrite it; Back closes the view
    page.execute_script("location.hash = ''")
    open_card(page, UNICODE)
    wait(page, lambda: page.execute_script("return location.hash") ==
         "#image=" + page.execute_script("return encodeURIComponent(arguments[0])", UNICODE))
    page.find_elements(By.CSS_SELECTOR, "#detail-body .ranks button")[1].click()
    wait(page, lambda: shows(UNICODE, 2))
    link = page.execute_script("return location.href")
    assert unquote(link.split("#image=")[1]) == UNICODE + "&rank=2"
    page.back()
    wait(page, lambda: not page.find_element(By.ID, "detail").is_displayed())
    page.get(link)
    page.refresh()
    wait(page, lambda: shows(UNICODE, 2))  # the copied URL opens what was shown
    assert console_errors(page) == []


def test_class_view_lists_the_report_classes_and_a_click_filters(page, audit_tree):
    from selenium.webdriver.common.by import By

    report = json.loads((audit_tree / "report" / "report.json").read_text())
    open_gallery(page, audit_tree)
    assert not page.find_element(By.ID, "class-view").is_displayed()
    page.find_element(By.ID, "view-classes").click()
    wait(page, lambda: page.find_element(By.ID, "class-view").is_displayed())
    assert not page.find_element(By.ID, "grid").is_displayed()
    rows = page.find_elements(By.CSS_SELECTOR, "#class-table tbody tr")
    assert len(rows) == len(report["classes"])
    by_records = sorted(report["classes"], key=lambda c: -c["records"])
    targets = [int(r.get_attribute("data-target")) for r in rows]
    assert [c["records"] for c in by_records] == [
        next(c for c in report["classes"] if c["target"] == t)["records"] for t in targets]
    names = page.execute_script(  # sort by name: a click on the heading
        "document.querySelector('#class-table th button[data-column=\"0\"]').click();"
        "return Array.from(document.querySelectorAll('#class-table tbody tr'))"
        ".map(r => r.children[1].textContent)")
    assert names == sorted((c["name"] for c in report["classes"]), key=str.lower)
    recs = manifest(audit_tree)
    top = {}  # target -> keys whose top map is of it
    for r in recs:
        if r["status"] == "ok" and r.get("rank") == 1:
            top.setdefault(r["target"], set()).add(r["key"])
    c = next(c for c in report["classes"] if c["target"] in top and c["tile"] != [0, 0]
             and c["located"])
    row = page.find_element(By.CSS_SELECTOR, f'#class-table tr[data-target="{c["target"]}"]')
    tile = row.find_element(By.CSS_SELECTOR, ".tile")
    row_at, col_at = c["tile"]
    assert tile.value_of_css_property("background-position") == (
        f"{-(2 + 10 * col_at)}px {-(2 + 13 * row_at)}px")  # gap 2, tile 8, label 3
    assert "class_means.png" in tile.value_of_css_property("background-image")
    # the offset lands on the class's own square of the grid image (one gray level each)
    from PIL import Image

    x, y = (-int(v.removesuffix("px")) for v in
            tile.value_of_css_property("background-position").split())
    with Image.open(audit_tree / "report" / "class_means.png") as grid:
        square = grid.crop((x, y, x + 8, y + 8)).getcolors()
    assert square == [(64, 40 * report["classes"].index(c) + 20)]
    assert f"{c['hits']} hits of {c['located']}" in row.find_elements(
        By.TAG_NAME, "td")[4].get_attribute("title")
    row.click()
    wait(page, lambda: page.find_element(By.ID, "grid").is_displayed())
    wait(page, lambda: set(card_keys(page)) == top[c["target"]])
    open_gallery(page, audit_tree)  # #classes: a link to the class view
    page.get((audit_tree / "index.html").resolve().as_uri() + "#classes")
    page.refresh()
    wait(page, lambda: page.find_element(By.ID, "class-view").is_displayed())
    assert console_errors(page) == []
