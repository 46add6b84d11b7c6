"""End-to-end: the web client in real headless Chromium against a live server.

Each test starts the real server as a process (``procs.ServerProcess``:
``imserver serve``, gunicorn), opens the client at ``/`` in one browser
context per user (so each has its own localStorage, as separate browsers
would) and drives it only through the page: the sign-in form, the "New chat"
and group forms, the composer. It checks what a person sees, through the
selectors that ``imserver/static/app.js`` documents for tests, with
Playwright's auto-waiting expectations; nothing sleeps. People are shown by
username: the client looks ids up with ``GET /api/users/<id>`` (cached in
localStorage) and typed names with ``GET /api/users?username=``.

Chromium is Debian's (``/usr/bin/chromium``) and the driver the
``playwright`` package's wheel ships; without them the tests skip, unless
``IMSERVER_REQUIRE_SERVICES=1`` (CI), where they fail (see ``browser.py``).

``IMSERVER_UPDATE_SCREENSHOTS=1`` makes the screenshot test also write
``docs/screenshot-chat.png`` (it always writes its screenshots under the
test's ``tmp_path``).
"""

import os
import re
import shutil
import struct
from pathlib import Path

import pytest

import browser
from browser import LAPTOP
from browser import PHONE
from browser import RECONNECT_WAIT
from browser import WAIT
from browser import ChatPage
from procs import ServerPool

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Records what the page's WebSockets do that the page does not show: every
# frame sent (window.__wsSent, to wait for the client's acks) and every close
# event's code (window.__wsClosed, to check what close code reached the browser).
RECORD_WS = """
(() => {
  const sent = window.__wsSent = [];
  const closed = window.__wsClosed = [];
  const Native = window.WebSocket;
  const send = Native.prototype.send;
  Native.prototype.send = function (data) {
    try { sent.push(JSON.parse(data)); } catch (e) { sent.push(String(data)); }
    return send.call(this, data);
  };
  function Recorded(url, protocols) {
    const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
    ws.addEventListener('close', (ev) => closed.push(ev.code));
    return ws;
  }
  Recorded.prototype = Native.prototype;
  for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) Recorded[k] = Native[k];
  window.WebSocket = Recorded;
})();
"""


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module (each test gets fresh contexts)."""
    browser.require()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = browser.launch(playwright)
        yield instance
        instance.close()


@pytest.fixture
def servers(tmp_path, request):
    """Start ``ServerProcess`` objects; kill whatever is left at teardown,
    printing their logs if the test failed."""
    pool = ServerPool(tmp_path)
    failed_before = request.session.testsfailed
    yield pool
    pool.close(print_logs=request.session.testsfailed > failed_before)


@pytest.fixture
def open_page(chromium, tmp_path, request):
    """``open_page(server, viewport=LAPTOP, context=None)``: a ChatPage on the
    client at ``/``; a new browser context (a new "browser") unless
    ``context`` (another page's ``.page.context``) is given."""
    contexts = []
    pages = []

    def open_(server, viewport=LAPTOP, context=None):
        if context is None:
            context = chromium.new_context(viewport=viewport)
            context.add_init_script(RECORD_WS)
            contexts.append(context)
        page = ChatPage(context.new_page(), server)
        pages.append(page)
        return page.goto()

    failed_before = request.session.testsfailed
    yield open_
    if request.session.testsfailed > failed_before:
        # Keep what each page showed for the failure report.
        for i, page in enumerate(pages):
            if not page.page.is_closed():
                path = tmp_path / f"failure-page-{i}.png"
                try:
                    page.page.screenshot(path=str(path))
                    print(f"page {i} ({page.username}): {path}; JS errors: {page.errors}")
                except Exception as exc:  # noqa: BLE001 - best effort
                    print(f"page {i}: no screenshot ({exc})")
    for context in contexts:
        context.close()


def ids_of(page):
    """The data-id of every message of the open conversation, in page order."""
    return page.messages.evaluate_all("els => els.map(e => Number(e.dataset.id))")


def expect_acked(page, seq):
    """Wait until the page has sent a cumulative ack of ``seq`` or more."""
    page.page.wait_for_function(
        "seq => (window.__wsSent || []).some(f => f && f.type === 'ack' && f.seq >= seq)",
        arg=seq, timeout=WAIT)


def expect_closed_with(page, code):
    """Wait until one of the page's WebSockets got a close event of ``code``."""
    page.page.wait_for_function(
        "code => (window.__wsClosed || []).includes(code)", arg=code, timeout=WAIT)


def png_size(path):
    """Return (width, height) of a PNG file, checking its signature."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# -- 1. two users chat live ---------------------------------------------------------------


def test_two_users_chat_both_ways(servers, open_page):
    server = servers()
    alice, bob = open_page(server), open_page(server)
    alice_id = alice.register("alice")
    bob_id = bob.register("bob")
    assert alice_id != bob_id
    for page in (alice, bob):
        page.expect_online()
        page.expect(page.by_id("conn-notice")).to_be_hidden()

    # Alice opens a chat with Bob by typing his username; he is online, and
    # the list and the title name him.
    alice.open_chat(bob_id, typed="bob")
    alice.expect_names("user", bob_id, "bob")
    alice.expect(alice.by_id("chat-subtitle")).to_contain_text(f"user id {bob_id}")
    alice.expect(alice.conversation("user", bob_id).locator(".presence")).to_have_attribute(
        "data-online", "true", timeout=WAIT)
    alice.expect(alice.by_id("chat-subtitle")).to_contain_text("online", timeout=WAIT)
    alice.send_and_confirm("hi bob")

    # Bob, with no conversation open, gets it live: a new conversation, unread 1.
    bob.expect(bob.unread("user", alice_id)).to_have_text("1", timeout=WAIT)
    bob.expect(bob.unread("user", alice_id)).to_have_attribute("data-count", "1")
    bob.expect(bob.conversation("user", alice_id).locator(".conv-preview")).to_have_text("hi bob")
    # Bob only got her id (in the frame): the client looks up her name.
    bob.expect_names("user", alice_id, "alice")
    bob.open_conversation("user", alice_id)
    bob.expect(bob.by_id("chat-title")).to_have_text("alice")
    bob.expect(bob.unread("user", alice_id)).to_be_hidden()
    bob.expect_bodies(["hi bob"])
    received = bob.message("hi bob")
    bob.expect(received).to_have_attribute("data-status", "received")
    bob.expect(received).to_have_attribute("data-from", str(alice_id))

    # And back, then one more each way, while both conversations are open.
    bob.send_and_confirm("hello alice")
    alice.expect_bodies(["hi bob", "hello alice"])
    alice.send_and_confirm("how are you?")
    bob.send_and_confirm("fine, thanks")
    expected = ["hi bob", "hello alice", "how are you?", "fine, thanks"]
    alice.expect_bodies(expected)
    bob.expect_bodies(expected)
    alice.expect(alice.message("fine, thanks")).to_have_attribute("data-status", "received")

    # Both pages show the same stored messages, in id order, and stay online.
    assert ids_of(alice) == ids_of(bob)
    assert ids_of(alice) == sorted(ids_of(alice))
    assert len(set(ids_of(alice))) == 4

    # A username nobody has: the server's error, the typed text kept, no new
    # conversation.
    alice.by_id("new-chat-id").fill("nobody")
    alice.by_id("new-chat-open").click()
    alice.expect(alice.error).to_have_attribute("data-code", "not_found", timeout=WAIT)
    alice.expect(alice.error).to_contain_text("not_found: no such user")
    alice.expect(alice.by_id("new-chat-id")).to_have_value("nobody")
    alice.expect(alice.page.locator("#conversations .conversation")).to_have_count(1)
    alice.expect_open("user", bob_id)
    alice.by_id("error-close").click()
    for page in (alice, bob):
        page.expect_online()
        page.expect_no_errors()


# -- 2. offline messages wait, in order, with an unread count -------------------------------


@pytest.mark.parametrize("comeback", ["reopen", "login"])
def test_offline_messages_arrive_in_order_with_unread_count(servers, open_page, comeback):
    """Alice's page goes away; Bob sends three messages; Alice comes back by
    reopening the client in her browser ("reopen": the stored token signs her
    in) or by logging in from another browser ("login"): the three are there,
    in order, counted as unread, and acked so that they never come again."""
    server = servers()
    alice, bob = open_page(server), open_page(server)
    alice_id = alice.register("alice")
    bob_id = bob.register("bob")
    alice.expect_online()
    bob.expect_online()
    alice.open_chat(bob_id)
    alice.expect_names("user", bob_id, "bob")   # looked up by id, then cached
    alice.send_and_confirm("are you there?")
    bob.expect(bob.unread("user", alice_id)).to_have_text("1", timeout=WAIT)
    bob.open_conversation("user", alice_id)
    bob.expect_bodies(["are you there?"])

    # Alice goes offline: her page (or her whole browser) is closed.
    alice_context = alice.page.context
    if comeback == "reopen":
        alice.page.close()
    else:
        alice_context.close()

    later = ["one", "two", "three"]
    for text in later:
        bob.send_and_confirm(text)
    bob.expect_bodies(["are you there?"] + later)

    user_lookups = []   # GET /api/users/<id> of the reopened page's browser

    def record_lookup(request):
        if re.search(r"/api/users/\d+$", request.url):
            user_lookups.append(request.url)

    if comeback == "reopen":
        alice_context.on("request", record_lookup)
        back = open_page(server, context=alice_context)   # same localStorage
        back.expect_online()
        back.expect(back.by_id("me")).to_have_attribute("data-user-id", str(alice_id))
    else:
        back = open_page(server)                          # a new browser
        assert back.login("alice") == alice_id
        back.expect_online()

    unread = back.unread("user", bob_id)
    back.expect(unread).to_have_text("3", timeout=WAIT)
    back.expect(unread).to_have_attribute("data-count", "3")
    back.expect(unread).to_be_visible()
    back.expect(back.conversation("user", bob_id).locator(".conv-preview")).to_have_text("three")
    back.expect_names("user", bob_id, "bob")
    if comeback == "reopen":
        # The name came from this browser's cache: it was not asked again.
        assert user_lookups == []
    # The replayed entries are acked (Alice's inbox seqs 1..3).
    expect_acked(back, 3)

    back.open_conversation("user", bob_id)
    back.expect(unread).to_be_hidden()
    back.expect_bodies(["are you there?"] + later)
    for text in later:
        back.expect(back.message(text)).to_have_attribute("data-status", "received")
    assert ids_of(back) == ids_of(bob)
    assert ids_of(back) == sorted(ids_of(back))

    # Acked means gone from the inbox: a fresh tab of that browser gets only
    # what is new (the 4th entry follows any replay, so 1 proves none came).
    fresh = open_page(server, context=back.page.context)
    fresh.expect_online()
    # The older tab of the same user was replaced (close 4001) and says so.
    back.expect(back.conn_state).to_have_text("offline", timeout=WAIT)
    back.expect(back.by_id("conn-notice")).to_have_attribute("data-reason", "replaced")
    expect_closed_with(back, 4001)
    bob.send_and_confirm("four")
    fresh.expect(fresh.unread("user", bob_id)).to_have_text("1", timeout=WAIT)
    fresh.open_conversation("user", bob_id)
    fresh.expect_bodies(["are you there?"] + later + ["four"])

    bob.expect_online()
    for page in (fresh, bob):
        page.expect_no_errors()
    assert back.errors == []


# -- 3. a group of three ---------------------------------------------------------------------


def test_group_of_three(servers, open_page):
    server = servers()
    alice, bob, carol = open_page(server), open_page(server), open_page(server)
    alice_id = alice.register("alice")
    bob_id = bob.register("bob")
    carol_id = carol.register("carol")
    for page in (alice, bob, carol):
        page.expect_online()

    # Members typed as a username and as an id; the subtitle names them all.
    group_id = alice.create_group("weekend trip", ["bob", carol_id])
    alice.expect(alice.by_id("chat-subtitle")).to_contain_text("3 members", timeout=WAIT)
    alice.expect(alice.by_id("chat-subtitle")).to_contain_text(
        "alice (owner), bob, carol", timeout=WAIT)
    alice.expect(alice.conversation("group", group_id).locator(".conv-name")).to_have_text(
        "weekend trip")
    alice.send_and_confirm("who brings the tent?")

    # Bob and Carol learn of the group from its first message.
    for page in (bob, carol):
        conv = page.conversation("group", group_id)
        page.expect(page.unread("group", group_id)).to_have_text("1", timeout=WAIT)
        page.expect(conv.locator(".conv-name")).to_have_text("weekend trip", timeout=WAIT)
        page.open_conversation("group", group_id)
        page.expect(page.by_id("chat-title")).to_have_text("weekend trip")
        page.expect_bodies(["who brings the tent?"])
        msg = page.message("who brings the tent?")
        page.expect(msg).to_have_attribute("data-from", str(alice_id))
        page.expect(msg).to_have_attribute("data-status", "received")
        page.expect(msg.locator(".sender")).to_have_text("alice", timeout=WAIT)
        page.expect(page.by_id("chat-subtitle")).to_contain_text("3 members", timeout=WAIT)
        page.expect(page.by_id("chat-subtitle")).to_contain_text(
            "alice (owner), bob, carol", timeout=WAIT)

    # A reply from Bob reaches the two others, with the group open.
    bob.send_and_confirm("I do")
    expected = ["who brings the tent?", "I do"]
    for page in (alice, bob, carol):
        page.expect_bodies(expected)
    for page in (alice, carol):
        page.expect(page.message("I do")).to_have_attribute("data-from", str(bob_id))
        page.expect(page.message("I do").locator(".sender")).to_have_text("bob", timeout=WAIT)
    bob.expect(bob.message("I do").locator(".sender")).to_be_hidden()   # his own
    # The list's preview names the sender too.
    carol.expect(carol.conversation("group", group_id).locator(".conv-preview")).to_have_text(
        "bob: I do", timeout=WAIT)
    carol.send_and_confirm("I bring food")
    expected.append("I bring food")
    for page in (alice, bob, carol):
        page.expect_bodies(expected)
    assert ids_of(alice) == ids_of(bob) == ids_of(carol)
    for page in (alice, bob, carol):
        page.expect_online()
        page.expect_no_errors()


# -- 4. the server restarts -------------------------------------------------------------------


def test_page_survives_a_server_restart(servers, open_page):
    server = servers()
    alice, bob = open_page(server), open_page(server)
    alice.register("alice")
    bob_id = bob.register("bob")
    alice.expect_online()
    bob.expect_online()
    alice.open_chat(bob_id)
    alice.send_and_confirm("before the restart")
    bob.open_conversation("user", alice.user_id)
    bob.expect_bodies(["before the restart"])

    # SIGTERM: the server closes every socket with 1001 and exits.
    assert server.stop() == 0, server.log()
    for page in (alice, bob):
        expect_closed_with(page, 1001)
        page.expect(page.conn_state).to_have_text(re.compile(r"^(offline|connecting)$"),
                                                  timeout=WAIT)
        page.expect(page.by_id("conn-notice")).to_have_attribute(
            "data-reason", "retrying", timeout=WAIT)
        page.expect(page.by_id("conn-notice")).to_contain_text("Reconnecting", timeout=WAIT)

    # Written while the server is down: it waits as pending.
    alice.send("written while offline")
    pending = alice.message("written while offline")
    alice.expect(pending).to_have_attribute("data-status", "pending")
    alice.expect(pending.locator(".status")).to_have_text("waiting for connection", timeout=WAIT)

    # The same database and port: each page comes back by itself (backoff).
    server = servers.restart(server, port=server.port)
    for page in (alice, bob):
        page.expect_online(timeout=RECONNECT_WAIT)
        page.expect(page.by_id("conn-notice")).to_be_hidden(timeout=WAIT)

    # The pending message went out after `ready`, once.
    alice.expect_sent("written while offline")
    bob.expect_bodies(["before the restart", "written while offline"])

    # And messages flow both ways after the restart.
    bob.send_and_confirm("after the restart")
    alice.send_and_confirm("welcome back")
    expected = ["before the restart", "written while offline", "after the restart",
                "welcome back"]
    alice.expect_bodies(expected)
    bob.expect_bodies(expected)
    assert ids_of(alice) == ids_of(bob)
    for page in (alice, bob):
        page.expect_no_errors()


# -- 5. how it looks: a laptop screenshot, and a phone --------------------------------------


def _chat_with_a_few_messages(servers, open_page, viewport):
    server = servers()
    alice, bob, carol = (open_page(server, viewport=viewport) for _ in range(3))
    alice_id = alice.register("alice")
    bob_id = bob.register("bob")
    carol_id = carol.register("carol")
    for page in (alice, bob, carol):
        page.expect_online()
    # A group in Alice's list too, so the list is not a single entry.
    alice.create_group("weekend trip", ["bob", "carol"])
    alice.send_and_confirm("Tent or cabin this time?")
    if viewport["width"] <= 720:
        alice.by_id("back").click()
    alice.open_chat(bob_id, typed="bob")
    lines = [
        (alice, "Hi Bob! Are we still on for Saturday?"),
        (bob, "Yes! 10:00 at the station?"),
        (alice, "Perfect. I'll bring the map and some coffee \u2615"),
        (bob, "Great. Carol asked whether she can join us \u2014 she'd take the "
              "later train and meet us at the lake around noon."),
        (alice, "Of course, the more the merrier."),
    ]
    alice.send_and_confirm(lines[0][1])
    bob.expect(bob.unread("user", alice_id)).to_have_text("1", timeout=WAIT)
    bob.open_conversation("user", alice_id)
    for sender, text in lines[1:]:
        sender.send_and_confirm(text)
    alice.expect_bodies([text for _, text in lines])
    alice.expect_names("user", bob_id, "bob")
    bob.expect_names("user", alice_id, "alice")
    return alice, bob, carol


def test_screenshot_of_a_chat_at_laptop_size(servers, open_page, tmp_path):
    alice, bob, _ = _chat_with_a_few_messages(servers, open_page, LAPTOP)
    alice.expect(alice.by_id("chat-subtitle")).to_contain_text("online", timeout=WAIT)
    alice.expect_online()
    alice.page.locator("#composer").fill("See you there!")
    alice.expect_no_errors()

    path = tmp_path / "screenshot-chat.png"
    alice.page.screenshot(path=str(path))
    assert png_size(path) == (LAPTOP["width"], LAPTOP["height"])
    if os.environ.get("IMSERVER_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / "screenshot-chat.png")


def test_phone_viewport_shows_one_pane(servers, open_page, tmp_path):
    alice, bob, _ = _chat_with_a_few_messages(servers, open_page, PHONE)
    page = alice.page

    def no_horizontal_overflow():
        return page.evaluate(
            "() => document.documentElement.scrollWidth <= window.innerWidth"
            " && document.body.scrollWidth <= window.innerWidth")

    # A conversation fills the screen: no sidebar, composer and back visible.
    alice.expect(alice.by_id("layout")).to_have_attribute("data-pane", "chat")
    alice.expect(alice.by_id("sidebar")).to_be_hidden()
    for element_id in ("back", "composer", "send", "chat-title", "conn-state"):
        alice.expect(alice.by_id(element_id)).to_be_in_viewport()
    assert no_horizontal_overflow()
    # Bubbles stay inside the screen.
    right_edges = alice.messages.evaluate_all(
        "els => els.map(e => e.getBoundingClientRect().right)")
    assert right_edges and max(right_edges) <= PHONE["width"]
    page.screenshot(path=str(tmp_path / "phone-chat.png"))

    # Back to the list: the sidebar fills the screen, the chat is hidden.
    alice.by_id("back").click()
    alice.expect(alice.by_id("layout")).to_have_attribute("data-pane", "list")
    alice.expect(alice.by_id("sidebar")).to_be_visible()
    alice.expect(alice.by_id("chat")).to_be_hidden()
    alice.expect(alice.by_id("new-chat-id")).to_be_in_viewport()
    alice.expect(alice.conversation("user", bob.user_id)).to_be_visible()
    assert no_horizontal_overflow()
    page.screenshot(path=str(tmp_path / "phone-list.png"))
    alice.expect_no_errors()
