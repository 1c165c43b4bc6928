"""`python app.py` end to end: a real server on 127.0.0.1 driven by headless Chromium, plus concurrent API clients.

CI installs Debian's `chromium` (/usr/bin/chromium); without it these tests fail (not skip) and say so.
Playwright drives that binary (no `playwright install`). The screenshot is kept in the test's tmp dir
and copied to /tmp/gpt_moe_app.png.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.serve.chat import generate_reply
from gpt_moe.serve.generate import SamplingConfig

pytestmark = pytest.mark.browser

APP = Path(__file__).resolve().parent.parent / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOWN_TOKENS = 120  # the reply watched streaming
LONG_TOKENS = 256  # the reply stopped with the Stop button (the test model's context allows up to 256)
CANDIDATES = ("Tell me about the quick brown fox.", "Hello, which experts do you use?", "def add(a, b):",
              "Why do experts route tokens?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture(scope="module")
def long_message(tiny_checkpoint) -> str:
    """A message whose greedy reply runs to LONG_TOKENS, so there is a stream to watch and to stop."""
    loaded = load_for_inference(tiny_checkpoint)
    for message in CANDIDATES:
        reply = generate_reply(loaded.model, loaded.tokenizer, [{"role": "user", "content": message}],
                               SamplingConfig(max_new_tokens=LONG_TOKENS, temperature=0.0,
                                              repetition_penalty=1.1))
        "".join(reply)
        if reply.finish_reason == "length":
            return message
    pytest.fail(f"none of {CANDIDATES} gets a greedy reply of {LONG_TOKENS} tokens from the test model")


@contextlib.contextmanager
def serving(checkpoint: Path, log_path: Path, *args: str) -> Iterator[dict]:
    """`python app.py --checkpoint CHECKPOINT ARGS` on a free port of 127.0.0.1, up and answering, for the block."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(APP), "--checkpoint", str(checkpoint), "--port", str(port),
                                    *args], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not serve {url} within 60 s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield {"url": url, "port": port, "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def browsing(url: str):
    """A headless Chromium page on the app at `url`, its message box ready."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1400})
            page.set_default_timeout(30_000)
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#message textarea").wait_for()
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with serving(tiny_checkpoint, tmp_path_factory.mktemp("app") / "app.log", "--concurrency", "2") as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with browsing(server["url"]) as page:
        yield page


WATCH_REPLY = """() => {
    window.__replyLengths = [];
    const chat = document.querySelector('#chat');
    window.__replyWatch = new MutationObserver(() => {
        const bots = chat.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.__replyLengths.push(bots[bots.length - 1].innerText.length);
    });
    window.__replyWatch.observe(chat, {subtree: true, childList: true, characterData: true});
}"""
REPLY_DONE = """() => {
    const s = document.querySelector('#routing-summary');
    return !!s && /tokens \\((ended|stopped)/.test(s.innerText);
}"""


def set_number(page, elem_id: str, value: int | float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def bot_text(page) -> str:
    bots = page.locator('#chat [data-testid="bot"]')
    return bots.last.inner_text() if bots.count() else ""


def send(page, message: str) -> None:
    page.locator("#message textarea").fill(message)
    page.locator("#send").click()


def test_page_streams_a_reply_and_shows_its_routing(page, long_message, tmp_path):
    set_number(page, "temperature", 0)
    set_number(page, "max-new-tokens", SHOWN_TOKENS)
    page.evaluate(WATCH_REPLY)
    send(page, long_message)
    page.wait_for_function(REPLY_DONE, timeout=45_000)
    page.locator("#routing-heatmap img").wait_for()
    page.locator("#routing-load img").wait_for()
    lengths = page.evaluate("window.__replyWatch.disconnect() || window.__replyLengths")
    final = len(bot_text(page))
    growing = sorted({n for n in lengths if 0 < n < final})
    assert final > 0 and len(growing) >= 3, f"the reply did not stream: lengths seen {lengths[:50]}"
    summary = page.locator("#routing-summary").inner_text()
    assert f"{SHOWN_TOKENS} tokens (stopped at the token limit)" in summary
    assert "tokens/s" in summary and "MTP draft acceptance" in summary  # speculative by default: it has an MTP block
    assert page.locator("#speculative input").is_checked()
    facts = page.locator("#facts").inner_text()
    assert "step 42" in facts and "MTP draft acceptance" in facts
    heatmap = page.locator("#routing-heatmap img").bounding_box()
    assert heatmap["width"] > 200 and heatmap["height"] > 100
    page.wait_for_timeout(300)  # let the images finish painting
    shot = tmp_path / "gpt_moe_app.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, "/tmp/gpt_moe_app.png")


def test_stop_cancels_the_reply_and_the_page_keeps_working(page, long_message):
    """Uncancelled, this reply takes seconds (LONG_TOKENS greedy tokens, then its routing summary);
    stopped right after sending, its text freezes and the summary never reports a finished reply."""
    page.locator("#clear").click()
    page.wait_for_function("() => !document.querySelector('#chat [data-testid=bot]')")
    set_number(page, "temperature", 0)
    set_number(page, "max-new-tokens", LONG_TOKENS)
    send(page, long_message)
    page.locator('#chat [data-testid="user"]').last.wait_for()
    page.locator("#stop").click()
    page.wait_for_timeout(4000)
    frozen = bot_text(page)
    page.wait_for_timeout(1500)
    assert bot_text(page) == frozen and not page.evaluate(REPLY_DONE)

    set_number(page, "max-new-tokens", 8)
    send(page, "and now?")
    page.wait_for_function(REPLY_DONE, timeout=30_000)  # the next request is answered


def test_concurrent_requests_are_all_answered_on_loopback_only(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    jobs = [client.submit(f"hello {i}", [], 1.0, 50, 0.95, 24, i, 1.1, "", api_name="/chat") for i in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job.result(timeout=60), jobs))
    for box, history, heatmap, load, summary in results:
        assert box == "" and [m["role"] for m in history] == ["user", "assistant"]
        assert "tokens** (" in summary and Path(heatmap).is_file() and Path(load).is_file()
    outward = outward_address()
    if outward is not None:  # bound to 127.0.0.1: another interface of this machine refuses the connection
        with pytest.raises(OSError):
            socket.create_connection((outward, server["port"]), timeout=2).close()
