"""The web page in a real browser: Debian's Chromium, headless, driven by Selenium against `capcli serve`.

Screenshots are kept as test artefacts in $CAPCLI_TEST_ARTEFACTS (default: capcli-test-artefacts in the
temporary folder); the test prints where.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from serve_helpers import PHOTOS, running_server

from capcli.runtime.captioner import caption_images, open_captioner

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTEFACTS = Path(os.environ.get("CAPCLI_TEST_ARTEFACTS", Path(tempfile.gettempdir()) / "capcli-test-artefacts"))

if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: install Debian's chromium and chromium-driver "
                "(.ci/run does it with apt-get)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# An attention bundle's result: per generated word (and <end>), weights over a 7x7 grid, peaking in turn.
FAKE_ATTENTION_RESULT = {
    "caption": "a cat", "score": -0.5, "alternatives": [{"caption": "a cat", "score": -0.5}],
    "attention": [[1.0 if p == peak else 0.01 for p in range(49)] for peak in (8, 24, 40)],
}
# The page's own code draws it into a new card, on the photo already shown; answers the heat maps' labels.
SHOW_ATTENTION = """
const [result, done] = [arguments[0], arguments[arguments.length - 1]];
fetch(document.querySelector(".card:not(.failed) img").src).then(r => r.blob()).then(blob => {
  const card = newCard(new File([blob], "attention.jpg", {type: blob.type}));
  showResult(card, result, {total: 1, read: 0, queue: 0, encode: 1, decode: 0});
  const labels = () => [...card.querySelectorAll(".attention figcaption")].map(f => f.textContent);
  const wait = () => card.querySelectorAll(".attention canvas").length ? done(labels()) : setTimeout(wait, 50);
  wait();
});
"""


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _finished_cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".card:not(.pending)")


def test_upload_a_photo_and_see_the_pipelines_caption(browser, exported_tiny, tmp_path, capsys):
    photo = PHOTOS[0]
    want = caption_images(open_captioner(exported_tiny, "onnx", provider="cpu"), [photo], beam_size=3, n_best=3)[0]
    with running_server(exported_tiny) as (url, _proc):
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "files").send_keys(str(photo))
        WebDriverWait(browser, 120).until(lambda d: len(_finished_cards(d)) == 1)
        card = _finished_cards(browser)[0]
        assert card.find_element(By.CSS_SELECTOR, ".caption").text == want.caption
        shown = [(browser.execute_script("return arguments[0].firstChild.textContent", li),
                  li.find_element(By.CSS_SELECTOR, ".s").text)
                 for li in card.find_elements(By.CSS_SELECTOR, ".alternatives li")]
        assert shown == [(c, f"{s:.3f}") for c, s in want.alternatives[1:]]

        not_an_image = tmp_path / "notes.txt"
        not_an_image.write_text("not a photo\n")
        browser.find_element(By.ID, "files").send_keys(str(not_an_image))
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card.failed"))
        failed = browser.find_element(By.CSS_SELECTOR, ".card.failed .caption").text
        assert failed == "notes.txt: not an image"

        labels = browser.execute_async_script(SHOW_ATTENTION, FAKE_ATTENTION_RESULT)
        assert labels == ["a", "cat", "<end>"]

        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTEFACTS / "serve-page.png"
        assert browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\nscreenshot of the web page: {shot}")


@pytest.fixture(scope="module")
def attention_bundle(tiny_attention_run, tmp_path_factory):
    from capcli.bundle.build import export

    return export(tiny_attention_run, tmp_path_factory.mktemp("exported") / "attention")


def test_an_attention_bundle_shows_a_heatmap_per_word_on_the_page(browser, attention_bundle):
    photo = PHOTOS[0]
    want = caption_images(open_captioner(attention_bundle, "onnx", provider="cpu"), [photo], beam_size=3,
                          attention=True)[0]
    with running_server(attention_bundle) as (url, _proc):
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text.strip())
        browser.find_element(By.ID, "files").send_keys(str(photo))
        WebDriverWait(browser, 120).until(lambda d: len(_finished_cards(d)) == 1)
        card = _finished_cards(browser)[0]
        assert card.find_element(By.CSS_SELECTOR, ".caption").text == want.caption
        WebDriverWait(browser, 30).until(lambda d: card.find_elements(By.CSS_SELECTOR, ".attention canvas"))
        labels = [f.text for f in card.find_elements(By.CSS_SELECTOR, ".attention figcaption")]
        assert labels == [w for w, _ in want.attention]
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTEFACTS / "serve-page-attention.png"))


def test_caption_html_heatmaps_render_in_a_browser(browser, attention_bundle, tmp_path, capsys):
    from typer.testing import CliRunner

    from capcli.cli import app

    page = tmp_path / "out.html"
    result = CliRunner().invoke(app, ["caption", *map(str, PHOTOS[:2]), "--model", str(attention_bundle),
                                      "--runtime", "onnx", "--attention", "--html", str(page)])
    assert result.exit_code == 0, result.output
    want = caption_images(open_captioner(attention_bundle, "onnx", provider="cpu"), PHOTOS[:2], beam_size=3,
                          attention=True)
    browser.get(page.as_uri())
    figures = browser.find_elements(By.CSS_SELECTOR, ".attention figure:not(.view)")
    assert [f.text for f in figures] == [w for r in want for w, _ in r.attention]
    # every heatmap is a real picture the browser decoded, not a broken image
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('.attention img')].map(i => [i.complete, i.naturalWidth])")
    assert sizes and all(done and width > 0 for done, width in sizes)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "caption-attention-report.png"
    assert browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\nscreenshot of the attention report: {shot}")


def test_name_the_object_asks_the_shipped_model_for_constrained_search(browser):
    shipped = Path(__file__).resolve().parents[1] / "exported" / "flickr8k"
    coffee = Path(__file__).parent / "images" / "coffee.jpg"
    with running_server(shipped) as (url, _proc):
        browser.get(url)
        WebDriverWait(browser, 60).until(lambda d: "flickr8k" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "files").send_keys(str(coffee))
        WebDriverWait(browser, 120).until(lambda d: len(_finished_cards(d)) == 1)
        plain = _finished_cards(browser)[0].find_element(By.CSS_SELECTOR, ".caption").text
        browser.find_element(By.NAME, "constrain").click()
        browser.find_element(By.ID, "files").send_keys(str(coffee))
        WebDriverWait(browser, 120).until(lambda d: len(_finished_cards(d)) == 2)
        texts = [card.text for card in _finished_cards(browser)]
        named = next(t for t in texts if "required: coffee" in t)  # the card asked for constrained search
        assert "coffee" not in plain.split() and "coffee" in named.split("\n")[1].split()
