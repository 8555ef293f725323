"""The web page in a real headless Chromium: choose an image, see its label and the bars."""

import base64
import shutil

import pytest

import cifarlab
from cifarlab.deploy.serve import create_app

from .conftest import CLASSES
from .test_export import train_tiny
from .test_serve import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def page(run):
    with running_server(create_app(cifarlab.load(run[0]))) as url:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                tab = browser.new_page()
                tab.set_default_timeout(30_000)
                tab.goto(url + "/")
                yield tab
            finally:
                browser.close()


def test_upload_shows_a_label_and_a_bar_per_class(page, run):
    page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
    page.set_input_files("#file", str(run[1] / "dog" / "004.png"))
    page.wait_for_selector("#output:not([hidden])")
    label = page.text_content("#label")
    assert label in CLASSES
    bars = page.locator("#bars .bar")
    assert bars.count() == len(CLASSES)
    names = [bars.nth(i).locator(".name").text_content() for i in range(bars.count())]
    assert sorted(names) == sorted(CLASSES) and names[0] == label  # sorted, best first
    widths = [
        float(bars.nth(i).locator(".fill").get_attribute("style").split("width:")[1].split("%")[0])
        for i in range(bars.count())
    ]
    assert widths == sorted(widths, reverse=True) and abs(sum(widths) - 100) < 1
    assert page.get_attribute("#preview", "src").startswith("blob:")
    assert page.is_hidden("#error")


def test_a_non_image_shows_the_servers_error(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.png is not an image" in page.text_content("#error")


def test_dropping_an_image_predicts_it(page, run):
    data = base64.b64encode((run[1] / "ship" / "002.png").read_bytes()).decode()
    page.evaluate("document.getElementById('label').textContent = ''")
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true });
            document.getElementById("drop").dispatchEvent(drop);
        }""",
        data,
    )
    page.wait_for_function("document.getElementById('label').textContent !== ''")
    assert page.text_content("#label") in CLASSES and page.is_visible("#output")


def test_the_heatmap_shows_beside_the_bars_and_the_toggle_hides_it(page, run, tmp_path):
    page.set_input_files("#file", str(run[1] / "cat" / "001.png"))
    page.wait_for_selector("#heatmap:not([hidden])")
    assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") == 256  # decoded
    label = page.text_content("#label")
    assert f'where the model saw "{label}"' in page.text_content("#explain-note")
    page.screenshot(path=str(tmp_path / "explain.png"), full_page=True)
    page.uncheck("#show-heatmap")
    assert page.is_hidden("#heatmap")
    page.check("#show-heatmap")  # the same image: shown again without another request
    page.wait_for_selector("#heatmap:not([hidden])")
