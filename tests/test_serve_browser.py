"""The web page in a real headless browser (Debian's chromium + chromedriver, see .ci/run):
load it, submit a prompt, see the text stream in and the sources appear; keep a screenshot."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from retrolm.cli import main as cli_main
from retrolm.database import Database
from tests.test_serve import KEY, PROMPT, serve
from tests.test_serve import world as world  # noqa: F401 (the module's fixture)

SCREENSHOT_ENV = "RETROLM_SCREENSHOT"  # a path to keep the screenshot at (CI artifact)


def find_chrome() -> tuple[str, str]:
    driver = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if driver is None or browser is None:
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs them)")
    return browser, driver


def test_the_page_streams_text_and_links_sources(world, tmp_path):  # noqa: F811
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = find_chrome()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900"):  # fmt: skip
        options.add_argument(flag)
    with serve(world, api_key=None) as server:
        driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "documents" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            tokens = driver.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys("60")
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
            output = driver.find_element(By.ID, "output").text
            assert output.startswith(PROMPT) and len(output) > len(PROMPT) + 20
            sources = driver.find_elements(By.CSS_SELECTOR, "#sources .chunk")
            assert len(sources) >= 3
            first = sources[0]
            assert first.find_elements(By.CSS_SELECTOR, ".neighbour .doc")
            assert "doc" in first.find_element(By.CSS_SELECTOR, ".neighbour .doc").text
            assert "score" in first.text
            refs = driver.find_elements(By.CSS_SELECTOR, "#output a.ref")
            assert [r.get_attribute("href").split("#")[1] for r in refs] == [
                s.get_attribute("id") for s in sources
            ]
            refs[-1].click()  # a mark in the text highlights the chunk it links to
            time.sleep(0.2)
            assert "highlight" in sources[-1].get_attribute("class")
            assert driver.find_element(By.ID, "error").text == ""
        finally:
            shot = tmp_path / "serve_page.png"
            driver.save_screenshot(str(shot))
            driver.quit()
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
    print(f"screenshot: {shot}")


def test_the_page_with_an_api_key_shows_html_in_documents_as_text(world, tmp_path):  # noqa: F811
    """With an API key, the page asks for it before it shows the model, then generates with it;
    documents whose names and text are HTML (a script, an img with onerror) show as text and
    run nothing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = find_chrome()
    db = shutil.copytree(world["db"], tmp_path / "db")
    new = tmp_path / "new"
    new.mkdir()
    html = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> '
    for i in range(6):  # some land in the valid split, which is not searched
        text = f"{html}{i} " * 12
        (new / f"<img src=x onerror=window.pwned={i}>{i}.txt").write_text(text, "utf-8")
    assert cli_main(["db", "add", str(db), str(new)]) == 0
    added = [d.name for d in Database.open(db).documents if "onerror" in d.name]
    train = [d for d in Database.open(db).documents if "onerror" in d.name and d.split == "train"]
    assert len(added) == 6 and train, "no added document in the train split"
    prompt = Path(train[0].name).read_text("utf-8")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    with serve(world, db=db) as server:  # with the test API key
        driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "enter the API key" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "api_key").send_keys(KEY, Keys.TAB)
            wait.until(lambda d: "documents" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "prompt").send_keys(prompt)
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
            assert driver.find_element(By.ID, "error").text == ""
            sources = driver.find_element(By.ID, "sources").text
            assert "onerror=window.pwned=" in sources  # a document name
            assert "<img src=x onerr" in sources and "</script>" in sources  # chunk texts
            assert driver.find_element(By.ID, "output").text.startswith(html.strip())
            names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".neighbour .doc")]
            assert train[0].name in names
            assert driver.find_elements(By.CSS_SELECTOR, "main img, main script") == []
            assert driver.execute_script("return window.pwned") is None
        finally:
            driver.quit()
