"""The search pages in headless Chromium (Debian's chromium and chromium-driver, Selenium):
search by mail, Chinese name and serial, a revoked certificate's mark, the .cer download, the
language switch, a phone-size viewport, a hostile name, the keyboard, and axe-core's
accessibility check (bundled by axe-selenium-python: offline). Screenshots of the main pages
go to the test's temporary folder (printed at the end of the module)."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import skip_or_fail

HOSTILE_CN = "<script>document.title='pwned'</script>\"onload=alert(1)"
HOSTILE_SERIAL = 0x5C21


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``certpub serve`` (one process) over the demo PKI plus one hostile subscriber."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from importer.run import import_openssl, import_paths
    from server.config import load_config
    from server.demo.pki import build_demo_pki, issue_certificate
    from tests.test_workers import Server

    folder = tmp_path_factory.mktemp("browser")
    now = datetime.now(UTC).replace(microsecond=0)
    pki = build_demo_pki(folder / "pki", now=now)
    text = re.sub(r'listen = \["tcp:\d+', 'listen = ["tcp:0', pki.config_path.read_text())
    pki.config_path.write_text(text)
    config = load_config(pki.config_path)
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
                      x509.NameAttribute(NameOID.COMMON_NAME, HOSTILE_CN)])
    hostile = issue_certificate(pki.cas["rsa-ca"], name, ["xss@evil.example"], HOSTILE_SERIAL,
                                now.replace(year=now.year - 1), now.replace(year=now.year + 1))
    hostile_path = folder / "hostile.pem"
    hostile_path.write_bytes(hostile.public_bytes(Encoding.PEM))
    import_openssl(config, now=lambda: datetime.now(UTC), progress=None)
    import_paths(config, [ca.crl_path for ca in pki.cas.values() if ca.crl_path] + [hostile_path],
                 now=lambda: datetime.now(UTC), progress=None)
    server = Server(pki.config_path, workers=1)
    try:
        found = server.wait_for(lambda f: "serving listeners=" in f.get("msg", ""))
        address = re.search(r"http:([\d.]+:\d+)", found["msg"])
        assert address is not None, found
        shots = folder / "screenshots"
        shots.mkdir()
        yield {"base": f"http://{address.group(1)}", "pki": pki, "shots": shots,
               "downloads": folder / "downloads"}
        print(f"\nscreenshots of the search pages: {shots}")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(site: dict[str, Any]) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        skip_or_fail("chromium and chromium-driver are not installed "
                     "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--lang=en-US", "--no-first-run",
                "--disable-background-networking", "--disable-component-update"):
        options.add_argument(arg)
    site["downloads"].mkdir(exist_ok=True)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(site["downloads"]),
        "download.prompt_for_download": False, "intl.accept_languages": "en-US,en"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(30)
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(site["downloads"])})
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, site: dict[str, Any], name: str) -> Path:
    """A full-page screenshot (the window grown to the page's height for it)."""
    width = driver.execute_script("return window.innerWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    size = driver.get_window_size()
    driver.set_window_size(size["width"], max(size["height"], min(height + 140, 4000)))
    path = site["shots"] / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    assert path.stat().st_size > 1000 and width > 0
    return path


def navigate(driver: Any, action: Any) -> None:
    """Do action (a click, a key), then wait until the next page has replaced this one (the
    mark put on this page's window is gone, and the new page is loaded)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.certpubOldPage = true")
    action()

    def loaded(d: Any) -> bool:
        try:
            return bool(d.execute_script(
                "return window.certpubOldPage === undefined && document.readyState === 'complete'"))
        except WebDriverException:  # between the two documents
            return False

    WebDriverWait(driver, 15).until(loaded)


def click(driver: Any, element: Any) -> None:
    navigate(driver, element.click)


def search(driver: Any, site: dict[str, Any], text: str, lang: str = "") -> None:
    from selenium.webdriver.common.by import By

    driver.get(site["base"] + "/" + (f"?lang={lang}" if lang else ""))
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(text)
    click(driver, driver.find_element(By.CSS_SELECTOR, "form.search button[type=submit]"))


def result_rows(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "table.results tbody tr")


def test_search_by_mail(browser: Any, site: dict[str, Any]) -> None:
    good = next(c for c in site["pki"].certs if c.state == "good" and c.emails)
    search(browser, site, good.emails[0].upper())
    rows = result_rows(browser)
    assert len(rows) == 1 and good.emails[0] in rows[0].text
    assert "One certificate was found" in browser.page_source
    shot(browser, site, "search-mail")


def test_search_by_chinese_name_and_open_it(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    search(browser, site, "陳大")
    rows = result_rows(browser)
    assert rows and all("陳大文" in r.text for r in rows)
    click(browser, rows[0].find_element(By.CSS_SELECTOR, "a"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Certificate of 陳大文"
    assert "/cert/" in browser.current_url
    shot(browser, site, "cert-chinese-name")


def test_search_by_serial_with_and_without_ca(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    search(browser, site, "0x0080")
    rows = result_rows(browser)
    assert len(rows) == 2 and {r.find_elements(By.TAG_NAME, "td")[2].text for r in rows} \
        == {"rsa-ca", "ec-ca"}
    Select(browser.find_element(By.ID, "ca")).select_by_value("ec-ca")
    click(browser, browser.find_element(By.CSS_SELECTOR, "form.search button"))
    rows = result_rows(browser)
    assert len(rows) == 1 and "ec-ca" in rows[0].text and "80" in rows[0].text
    shot(browser, site, "search-serial")


def test_a_revoked_certificate_is_marked(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    revoked = next(c for c in site["pki"].certs
                   if c.state == "revoked" and c.reason == "key_compromise")
    browser.get(f"{site['base']}/cert/{revoked.ca}/{revoked.serial:x}")
    box = browser.find_element(By.CSS_SELECTOR, "div.status")
    badge = box.find_element(By.CSS_SELECTOR, ".badge")
    assert "st-revoked" in box.get_attribute("class") and badge.is_displayed()
    assert badge.text.endswith("Revoked")  # after the ✖ the stylesheet puts before it
    assert "revoked on" in box.text and "the private key was compromised" in box.text
    assert badge.value_of_css_property("background-color") == "rgba(164, 22, 26, 1)"
    assert box.value_of_css_property("border-top-color") == "rgba(164, 22, 26, 1)"
    shot(browser, site, "cert-revoked")
    browser.get(f"{site['base']}/cert/{revoked.ca}/{revoked.serial:x}?lang=zh-Hant")
    assert "已撤銷" in browser.find_element(By.CSS_SELECTOR, "div.status .badge").text
    assert "私密金鑰已外洩" in browser.find_element(By.CSS_SELECTOR, "div.status").text
    shot(browser, site, "cert-revoked-zh-Hant")
    # the results list marks it too
    search(browser, site, revoked.emails[0] if revoked.emails else f"{revoked.serial:x}")
    assert browser.find_elements(By.CSS_SELECTOR, "table.results .badge.s-revoked")


def test_download_the_cer(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    good = next(c for c in site["pki"].certs if c.state == "good" and c.emails)
    browser.get(f"{site['base']}/cert/{good.ca}/{good.serial:x}")
    browser.find_element(By.PARTIAL_LINK_TEXT, ".cer").click()
    target = site["downloads"] / f"{good.ca}-{good.serial:x}.cer"
    end = time.monotonic() + 15
    while not target.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert target.read_bytes() == good.load().public_bytes(Encoding.DER)


def test_switch_language(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    search(browser, site, "joão")
    click(browser, browser.find_element(By.LINK_TEXT, "繁體中文"))
    html = browser.find_element(By.TAG_NAME, "html")
    assert html.get_attribute("lang") == "zh-Hant"
    assert browser.find_element(By.TAG_NAME, "h1").text == "查找證書"
    assert browser.find_element(By.ID, "q").get_attribute("value") == "joão"  # search kept
    assert result_rows(browser)
    shot(browser, site, "search-zh-Hant")
    # a search from here stays in Chinese (the form carries the language)
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("陳大")  # one character would be a listing ([privacy] min_chars_cjk = 2)
    click(browser, browser.find_element(By.CSS_SELECTOR, "form.search button"))
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "zh-Hant"
    click(browser, browser.find_element(By.LINK_TEXT, "Português"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Procurar um certificado"
    assert "Foi encontrado" in browser.page_source or "Foram encontrados" in browser.page_source
    rows = result_rows(browser)
    click(browser, rows[0].find_element(By.CSS_SELECTOR, "a"))
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "pt"
    shot(browser, site, "cert-pt")


def test_phone_viewport(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    browser.set_window_size(390, 844)
    try:
        search(browser, site, "Maria")
        assert result_rows(browser)
        inner = browser.execute_script("return window.innerWidth")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= inner
        row = result_rows(browser)[0]
        assert row.value_of_css_property("display") == "block"  # rows stack as cards
        shot(browser, site, "phone-search")
        click(browser, row.find_element(By.CSS_SELECTOR, "a"))
        assert browser.execute_script("return document.documentElement.scrollWidth") <= inner
        shot(browser, site, "phone-cert")
    finally:
        browser.set_window_size(1280, 1000)


def test_a_hostile_name_is_only_text(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    search(browser, site, "xss@evil.example")
    assert browser.title != "pwned"
    link = result_rows(browser)[0].find_element(By.CSS_SELECTOR, "a")
    assert link.text == HOSTILE_CN
    click(browser, link)
    assert browser.title.startswith("Certificate of <script>") and browser.title != "pwned"
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Certificate of {HOSTILE_CN}"
    assert not browser.find_elements(By.CSS_SELECTOR, "main script, [onload]")


def test_keyboard_only(browser: Any, site: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site["base"] + "/")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    first = browser.switch_to.active_element
    assert first.get_attribute("class") == "skip" and first.is_displayed()  # shown on focus
    first.send_keys(Keys.ENTER)
    for _ in range(12):  # tab on until the search box
        active = browser.switch_to.active_element
        if active.get_attribute("id") == "q":
            break
        active.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "q"
    box = browser.switch_to.active_element
    box.send_keys("陳大文")
    navigate(browser, lambda: box.send_keys(Keys.ENTER))
    assert result_rows(browser)


def _axe(browser: Any) -> list[dict[str, Any]]:
    from axe_selenium_python import Axe

    axe = Axe(browser)
    axe.inject()
    results = axe.run(options='{"runOnly": {"type": "tag", "values": '
                              '["wcag2a", "wcag2aa", "best-practice"]}}')
    return results["violations"]  # type: ignore[no-any-return]


def test_accessibility_of_every_page(browser: Any, site: dict[str, Any]) -> None:
    """axe-core (WCAG 2 A and AA, best practices) finds nothing on the search page with
    results, a revoked certificate's page, an error and the not-found page, in each language."""
    revoked = next(c for c in site["pki"].certs if c.state == "revoked")
    hold = next(c for c in site["pki"].certs if c.state == "hold")
    pages = ["/", "/?q=jo%C3%A3o", f"/cert/{revoked.ca}/{revoked.serial:x}",
             f"/cert/{hold.ca}/{hold.serial:x}", "/?q=zz&type=serial", "/cert/rsa-ca/dead00"]
    failures = {}
    checked = 0
    for lang in ("en", "zh-Hant", "pt"):
        for path in pages:
            sep = "&" if "?" in path else "?"
            browser.get(f"{site['base']}{path}{sep}lang={lang}")
            violations = _axe(browser)
            checked += 1
            if violations:
                failures[f"{path} {lang}"] = [(v["id"], v["impact"], len(v["nodes"]))
                                              for v in violations]
    assert checked == 18 and not failures, failures
    # and the check can fail: an image without a text alternative is reported
    browser.get(site["base"] + "/")
    browser.execute_script("var i = document.createElement('img'); i.src = '/static/none.png';"
                           " document.querySelector('main').appendChild(i);")
    assert "image-alt" in {v["id"] for v in _axe(browser)}
