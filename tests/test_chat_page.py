"""The chat page in a real headless Chromium, against a real `lmforge serve` of the tiny trained run.

Load `/`, send a message, watch the reply stream in event by event, rate it and find the rating saved
with the conversation; then stop a reply while it streams and keep what came. Needs Debian's chromium and
chromium-driver and selenium (a dev extra); skipped without them.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Chromium and ChromeDriver are not installed (apt install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lmforge.serving.server import wait_until_serving  # noqa: E402

# Seconds between two server-sent events on their way to the browser (see SlowEventRelay).
EVENT_GAP = 0.05
SSE_EVENT = re.compile(rb"(?:^|\n)data: [\[{]")
ENDS_A_REPLY = re.compile(rb'"finish_reason": "')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlowEventRelay:
    """A TCP relay between the browser and the server that passes the server's events on one at a time.

    The tiny model writes a whole reply in milliseconds, too fast to watch or to stop. The relay sends
    each server-sent event on its own, EVENT_GAP seconds after the one before, and while ``end_held``
    is set it keeps back the event that ends a reply (the one with a finish_reason), so the stream stays
    open. Everything else (the page, its files, JSON answers) passes at once. ``events`` holds every
    event passed on.
    """

    def __init__(self, server_port: int):
        self.server_port = server_port
        self.events: list[dict] = []
        self.end_held = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.end_held.clear()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                browser_side, _ = self._listener.accept()
            except OSError:
                return
            server_side = socket.create_connection(("127.0.0.1", self.server_port))
            threading.Thread(target=self._copy, args=(browser_side, server_side), daemon=True).start()
            threading.Thread(target=self._pass_events, args=(server_side, browser_side), daemon=True).start()

    @staticmethod
    def _close(*connections) -> None:
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def _copy(self, source, destination) -> None:
        try:
            while data := source.recv(65536):
                destination.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source, destination)

    def _pass_events(self, server_side, browser_side) -> None:
        pending = b""
        try:
            while data := server_side.recv(65536):
                *complete, pending = (pending + data).split(b"\n\n")  # an event ends with a blank line
                for piece in complete:
                    piece += b"\n\n"
                    if not SSE_EVENT.search(piece):
                        browser_side.sendall(piece)
                        continue
                    while ENDS_A_REPLY.search(piece) and self.end_held.is_set():
                        time.sleep(0.02)
                    payload = piece[SSE_EVENT.search(piece).end() - 1:].strip()
                    self.events.append(json.loads(payload) if payload != b"[DONE]" else {"done": True})
                    browser_side.sendall(piece)
                    time.sleep(EVENT_GAP)
                if not SSE_EVENT.search(pending):
                    browser_side.sendall(pending)
                    pending = b""
            browser_side.sendall(pending)
        except OSError:
            pass
        finally:
            self._close(server_side, browser_side)

    def reply_pieces(self) -> list[str]:
        """The reply text of each event passed on so far, in order."""
        return [event["choices"][0]["delta"]["content"] for event in self.events
                if event.get("choices") and event["choices"][0]["delta"].get("content")]


@pytest.fixture
def served_run(trained_run, tmp_path):
    """(URL, run folder, relay) for `lmforge serve` on a copy of the tiny run, without auth, reached through a SlowEventRelay."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(run), "--no-auth", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_until_serving(url, process, timeout=60)
        if problem:
            log.seek(0)
            pytest.fail(f"{problem}:\n{log.read()}")
        relay = SlowEventRelay(port)
        yield f"http://127.0.0.1:{relay.port}", run, relay
        relay.close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()



# The page rebuilds its message list after each change, so the tests read it in one script call each
# time rather than holding elements that may be replaced.

def last_reply(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#messages li.assistant")[-1]


def reply_text(browser) -> str:
    # textContent, exactly as streamed (WebElement.text would normalise the whitespace).
    return browser.execute_script("const r = document.querySelector('#messages li.assistant:last-child .text'); "
                                  "return r && r.textContent")


def reply_state(browser) -> str | None:
    return browser.execute_script("const r = document.querySelector('#messages li.assistant:last-child'); return r && r.dataset.state")


def reply_shown(browser) -> str:
    """Everything the last reply shows: its text, notes and feedback status."""
    return browser.execute_script("const r = document.querySelector('#messages li.assistant:last-child'); return r ? r.innerText : ''")


def set_field(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2  # what JavaScript's String.length counts


def test_chat_page_streams_rates_and_stops(served_run, browser):
    url, run, relay = served_run
    wait = WebDriverWait(browser, 20)
    browser.get(f"{url}/")
    wait.until(lambda d: d.find_element(By.ID, "model-name").text not in ("connecting...", ""))
    assert browser.find_element(By.ID, "model-name").text != "not connected", browser.find_element(By.ID, "error").text

    browser.find_element(By.CSS_SELECTOR, ".settings summary").click()
    set_field(browser, "temperature", "0")  # greedy: the same replies on every run of the test
    set_field(browser, "max-tokens", "24")
    # The length of every text the page puts into the last reply while it streams, in order.
    browser.execute_script("""
        window.streamedLengths = [];
        new MutationObserver((records) => {
          for (const record of records) {
            const reply = record.target.closest && record.target.closest('#messages li.assistant:last-child');
            if (!reply || reply.dataset.state !== 'streaming' || !record.target.matches('.text')) continue;
            record.addedNodes.forEach((node) => window.streamedLengths.push(node.data.length));
          }
        }).observe(document.getElementById('messages'), {subtree: true, childList: true});""")

    # Markup typed by the user stays text (the page never builds HTML from messages).
    message = "The <b>json</b> module"
    browser.find_element(By.ID, "message").send_keys(message, Keys.ENTER)
    wait.until(lambda d: reply_state(d) == "done")
    assert browser.find_element(By.ID, "error").text == ""
    reply = reply_text(browser)
    pieces = relay.reply_pieces()
    assert reply and reply == "".join(pieces) and relay.events[-1] == {"done": True}
    # Streamed: the page showed the reply growing event by event, as each arrived (the relay spaced them).
    assert browser.execute_script("return window.streamedLengths") == [utf16_length("".join(pieces[:n])) for n in range(1, len(pieces) + 1)]
    assert browser.find_element(By.CSS_SELECTOR, "#messages li.user .text").text == message
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages b")

    last_reply(browser).find_element(By.CSS_SELECTOR, "button[data-rating='up']").click()
    wait.until(lambda d: "Saved" in reply_shown(d))
    assert last_reply(browser).find_element(By.CSS_SELECTOR, "button[data-rating='up']").get_attribute("aria-pressed") == "true"
    feedback = [json.loads(line) for line in (run / "feedback" / "feedback.jsonl").read_text().splitlines() if line.strip()]
    assert len(feedback) == 1 and feedback[0]["rating"] == "up" and feedback[0]["conversation_id"]
    assert feedback[0]["messages"] == [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]

    # A second message no longer fits the tiny model's 64-token context with the first turn: the page leaves
    # the oldest turn out of the request (the server refuses the whole conversation) and says so.
    set_field(browser, "max-tokens", "40")
    browser.find_element(By.ID, "message").send_keys("Return the", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages li.assistant")) == 2 and reply_state(d) == "done")
    assert "2 oldest messages were left out" in reply_shown(browser) and reply_text(browser)
    assert browser.find_element(By.ID, "error").text == ""

    # A new chat whose reply is stopped while its stream is open (the relay holds the end back): the text
    # that came stays, and nothing more arrives.
    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages li")
    relay.events.clear()
    relay.end_held.set()
    browser.find_element(By.ID, "message").send_keys("def ", Keys.ENTER)
    wait.until(lambda d: len(reply_text(d) or "") > 0)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: reply_state(d) == "stopped")
    stopped = reply_text(browser)
    relay.end_held.clear()
    time.sleep(0.3)
    assert stopped and reply_text(browser) == stopped and stopped == "".join(relay.reply_pieces())[: len(stopped)]
    assert "Stopped." in reply_shown(browser)
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#conversations li")) == 2  # both chats are in the history
