"""The pages in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by Selenium uploads a CSV through the form, watches the bar reach 100%, and
saves a screenshot."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from imgsvc import localdb
from tests.e2e.processes import service_env, serving
from tests.servers import ImageServer, S3Server

T = TypeVar("T")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and its driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def local_service(database_url: str, s3: S3Server, tmp_path: Path) -> Iterator[str]:
    """imgsvc serve storing to a local folder, so the page shows images it serves itself."""
    port = localdb.free_port()
    env = service_env(database_url, s3, tmp_path, port)
    env.pop("AWS_BUCKET_NAME")
    with serving(env, tmp_path / "serve.log") as (base, _):
        yield base


def submit(browser: webdriver.Chrome, service: str, csv_file: Path) -> None:
    """Send a CSV through the upload form."""
    browser.get(service + "/")
    browser.find_element(By.ID, "file").send_keys(str(csv_file))
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def until(browser: webdriver.Chrome, seconds: float, condition: Callable[[webdriver.Chrome], T]) -> T:
    """What ``condition`` gives once it is truthy. While the form's answer replaces the
    page, an element can be missing or gone for a moment: that counts as not yet."""
    wait = WebDriverWait(
        browser,
        seconds,
        poll_frequency=0.05,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    return wait.until(condition, f"not there after {seconds} s on {browser.current_url}")


def test_upload_in_a_browser_and_watch_the_bar_reach_100(
    browser: webdriver.Chrome, local_service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    slow = image_server.url("/slow/700/kodak_kodim23.png")
    rows = [
        f'1,"Parrots, pair",{slow}',
        f'2,Rose,"{image_server.url("/img/mei_Panasonic_DMC-LC70.jpg")},{image_server.url("/status/404")}"',
    ]
    csv_file = tmp_path / "products.csv"
    csv_file.write_text("S. No.,Product Name,Input Image Urls\n" + "\n".join(rows) + "\n")
    submit(browser, local_service, csv_file)
    # The upload answers with a redirect: read the bar only once the request page is there.
    until(browser, 60, lambda b: "/requests/" in b.current_url and b.find_element(By.ID, "percent"))
    deadline = time.monotonic() + 60
    seen: set[str] = set()
    while browser.find_element(By.ID, "percent").text != "100%" or browser.find_element(
        By.ID, "state"
    ).text in ("queued", "processing", "loading"):
        seen.add(browser.find_element(By.ID, "percent").text)
        assert time.monotonic() < deadline, f"the bar stopped at {seen}"
        time.sleep(0.1)
    assert "/requests/" in browser.current_url
    assert browser.find_element(By.ID, "state").text == "completed_with_errors"
    assert any(value != "100%" for value in seen), "the bar never showed progress before 100%"
    rows_shown = browser.find_elements(By.CSS_SELECTOR, "#rows tr")
    assert len(rows_shown) == 3
    assert "Parrots, pair" in rows_shown[0].text and "smaller" in rows_shown[0].text
    assert "the source answered HTTP 404" in rows_shown[2].text
    after = rows_shown[0].find_elements(By.TAG_NAME, "img")[1]
    for _ in range(50):  # the output image, served by imgsvc itself, has loaded
        if browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", after):
            break
        time.sleep(0.1)
    assert browser.execute_script("return arguments[0].naturalWidth", after) == 768
    link = browser.find_element(By.ID, "csv")
    assert link.is_displayed() and str(link.get_attribute("href")).endswith("/output.csv")
    shot = tmp_path / "request-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_a_refused_upload_shows_its_problems_in_the_browser(
    browser: webdriver.Chrome, local_service: str, tmp_path: Path
) -> None:
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("S. No.,Product Name,Input Image Urls\n1,,ftp://x/y.jpg\n")
    submit(browser, local_service, csv_file)

    def refused(b: webdriver.Chrome) -> str:
        text: str = b.find_element(By.TAG_NAME, "body").text
        return text if "The upload was refused" in text else ""

    text = until(browser, 20, refused)
    assert "line 2, column Product Name: the product name is empty" in text
    assert "not ftp" in text
