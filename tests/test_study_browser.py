"""qsched study in a real browser: Debian's headless Chromium driven by Playwright votes by click and by key.

Skipped only where /usr/bin/chromium or the playwright package is absent (CI installs both). Set
QSCHED_STUDY_SCREENSHOT=path.png to save a screenshot of the rating page (docs/study.png is made that way).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from study_support import fresh_study  # noqa: E402

from qsched.study.app import create_app  # noqa: E402
from qsched.study.raters import add_raters  # noqa: E402
from qsched.study.server import ServerThread  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return fresh_study(tmp_path_factory, "browser")


def _wait_new_pair(page, old: str) -> str:
    page.wait_for_function("(old) => document.body.dataset.state === 'ready' && document.body.dataset.pairId !== old",
                           arg=old, timeout=15000)
    return page.evaluate("document.body.dataset.pairId")


def test_browser_votes_by_click_and_key(study):
    app = create_app(study, seed=0)
    store = app.state.store
    with ServerThread(app) as url, sync_api.sync_playwright() as pw:
        token = add_raters(url, app.state.admin_token, 1)[0]
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(f"{url}/?token={token}")
            pid = _wait_new_pair(page, "")
            prompt = page.inner_text("#prompt")
            assert prompt in app.state.manifest["prompts"]
            assert page.evaluate("document.getElementById('left').naturalWidth") == 32  # the image really loaded
            shot = os.environ.get("QSCHED_STUDY_SCREENSHOT")
            if shot:
                page.screenshot(path=shot)
            seen = [pid]
            for action, answer in [("click", "left"), ("ArrowRight", "right"), ("3", "tie"), ("click-bb", "both_bad")]:
                if action == "click":
                    page.click("#left")
                elif action == "click-bb":
                    page.click("#btn-both_bad")
                else:
                    page.keyboard.press(action)
                new = _wait_new_pair(page, seen[-1])
                (v,) = store.query("SELECT answer FROM votes WHERE pair_id=?", (seen[-1],))
                assert v["answer"] == answer
                assert new not in seen
                seen.append(new)
            assert store.n_votes() == 4
            assert "4 answered" in page.inner_text("#status")
        finally:
            browser.close()
