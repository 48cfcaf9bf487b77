"""The judging page in a real headless Chromium: it shows anonymised pairs, records clicks and key presses, shows results.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them) and selenium (a dev extra).
"""

import shutil
import threading

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Chromium and ChromeDriver are not installed (apt install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lmforge.evaluation.judge import JudgingSession, make_judge_server, read_votes  # noqa: E402

NAMES = ["alpha-model", "beta-model"]
PROMPTS = ["What does json.dumps do?", "Name a path library."]



def test_judging_in_a_real_browser(tmp_path, browser):
    # Model text that would run or render if the page ever put it into HTML.
    answers = {(name, i): f"{name[0]}{i}: <img src=x onerror=\"document.title='pwned'\"><b>bold</b>" for name in NAMES for i in range(2)}
    session = JudgingSession(tmp_path, NAMES, PROMPTS, answers, seed=1)
    server = make_judge_server(session, [{"name": name} for name in NAMES], port=0, bootstrap_samples=20, seed=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    wait = WebDriverWait(browser, 20)
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait.until(lambda d: d.find_element(By.ID, "judging").is_displayed())
        first = session.schedule[0]
        assert browser.find_element(By.ID, "prompt").text == PROMPTS[first.prompt_index]
        shown_left = browser.find_element(By.ID, "answer-1").text
        assert shown_left == answers[(first.left, first.prompt_index)]  # as text, tags and all
        assert not browser.find_elements(By.CSS_SELECTOR, "#answer-1 img, #answer-1 b") and browser.title != "pwned"
        assert not any(name in browser.page_source for name in NAMES)  # anonymised
        assert browser.find_element(By.ID, "progress").text == "0 of 2 pairs judged"

        browser.find_element(By.CSS_SELECTOR, "button[data-choice='1']").click()  # the left answer wins
        wait.until(lambda d: d.find_element(By.ID, "progress").text == "1 of 2 pairs judged")
        browser.find_element(By.TAG_NAME, "body").send_keys("t")  # the keyboard: a tie
        wait.until(lambda d: d.find_element(By.ID, "results").is_displayed())
        results = browser.find_element(By.ID, "results").text
        assert "2 votes, 1 ties." in results and all(name in results for name in NAMES)  # names only once judging is over
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    votes = read_votes(tmp_path / "votes.jsonl")
    assert [vote["winner"] for vote in votes] == [first.left, "tie"]
    assert (votes[0]["left"], votes[0]["prompt_index"]) == (first.left, first.prompt_index)
