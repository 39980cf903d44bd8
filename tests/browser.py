"""A real headless browser for the report's tests and README's screenshot: Debian's Chromium driven
by Selenium through Debian's ChromeDriver (the same version as the browser, from the same source).

`page(path)` opens a local HTML file and yields the driver; `console_errors`, `broken_images` and
`screenshot` are what the tests and the screenshot ask of it. Without the browser the tests fail
(not skip) with the command that installs it: CI (`.ci/run`) installs it.

    python tests/browser.py REPORT.html docs/report.png   # README's screenshot
"""
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ("apt-get install -y --no-install-recommends chromium chromium-driver && pip install selenium "
           "(or `pip install -e .[test]`; bash .ci/run does both)")
# headless, and nothing reached over the network: this machine has none, and the page needs none
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars")


def missing() -> List[str]:
    """What the browser tests lack (empty: they can run)."""
    out = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file() and not shutil.which(Path(path).name)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        out.append("the selenium package")
    return out


@contextmanager
def page(path: Path, width: int = 1400, height: int = 1000) -> Iterator[object]:
    """Chromium showing the local file `path` (loaded: the driver waits for the page's load event)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(Path(path).absolute().as_uri())
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> List[dict]:
    """The browser console's SEVERE entries since the page was opened (failed loads included)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def broken_images(driver) -> List[str]:
    """The <img> elements that did not decode (not complete, or no natural width), by alt text."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
        ".map(i => i.alt || i.src.slice(0, 60));")


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 1000, max_colours: int = 128) -> Path:
    """The top of the page as the browser shows it, as a small PNG (a palette of `max_colours`)."""
    from io import BytesIO

    from PIL import Image

    with page(html, width, height) as driver:
        data = driver.get_screenshot_as_png()
    picture = Image.open(BytesIO(data)).convert("RGB")
    picture.quantize(max_colours, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    return Path(png)


if __name__ == "__main__":
    if missing():
        sys.exit(f"missing: {', '.join(missing())}; install: {INSTALL}")
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
