"""Drive the web client in headless Chromium (Playwright), for test_browser.

Not a test module: tests import it as ``browser`` (pytest puts ``tests/`` on
``sys.path``, as for ``conftest`` and ``procs``).

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or the path in
``IMSERVER_CHROMIUM``), driven by the ``playwright`` Python package, whose
wheel ships its own driver (node included); nothing is downloaded, and
``playwright install`` is never needed. Without either, ``require()`` skips
the test with the reason, unless ``IMSERVER_REQUIRE_SERVICES=1`` (CI), where
it fails instead.

``ChatPage`` wraps one page of the client and speaks in the selectors that
``imserver/static/app.js`` documents for tests. Every wait is one of
Playwright's auto-waiting expectations with an explicit timeout scaled by
``TESTS_TIMEOUT_FACTOR`` (through ``conftest.T``); nothing sleeps.
"""

import os
import re

import pytest

from conftest import T

CHROMIUM = os.environ.get("IMSERVER_CHROMIUM", "/usr/bin/chromium")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Milliseconds, as Playwright counts. WAIT: what a page shows after an action
# on a live server (an HTTP call, a frame). RECONNECT_WAIT: the client's
# reconnect backoff (1 s doubling, 30 s at most, +-20 % jitter) after a server
# restart, plus the restart itself.
WAIT = int(2 * T * 1000)
RECONNECT_WAIT = int(8 * T * 1000)

PASSWORD = "password123"

LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 667}


def missing() -> str | None:
    """Return why the browser tests cannot run here, or None if they can."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright package is not installed "
                        "(pip install playwright; never `playwright install`)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return "; ".join(problems) or None


def require() -> None:
    """Skip (or, with IMSERVER_REQUIRE_SERVICES=1, fail) without a browser."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get("IMSERVER_REQUIRE_SERVICES") == "1":
        pytest.fail(f"browser tests required (IMSERVER_REQUIRE_SERVICES=1): {reason}",
                    pytrace=False)
    pytest.skip(f"browser tests need Chromium and Playwright: {reason}")


def launch(playwright):
    """Launch headless Chromium; Playwright gives it a fresh user-data-dir."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=CHROMIUM_ARGS)


class ChatPage:
    """One page (tab) of the web client, in its own or a shared context."""

    def __init__(self, page, server):
        from playwright.sync_api import expect

        self.page = page
        self.server = server
        self.expect = expect
        self.errors = []   # uncaught exceptions of the page's JavaScript
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.user_id = None
        self.username = None

    # -- locators -----------------------------------------------------------------

    def by_id(self, element_id):
        return self.page.locator(f"#{element_id}")

    @property
    def conn_state(self):
        return self.by_id("conn-state")

    @property
    def error(self):
        return self.by_id("error")

    def conversation(self, kind, conv_id):
        return self.page.locator(
            f'#conversations .conversation[data-kind="{kind}"][data-id="{conv_id}"]')

    def unread(self, kind, conv_id):
        return self.conversation(kind, conv_id).locator(".unread")

    @property
    def messages(self):
        return self.page.locator("#messages .message")

    @property
    def bodies(self):
        return self.page.locator("#messages .message .body")

    # -- actions ------------------------------------------------------------------

    def goto(self, server=None):
        """Load the client from ``server`` (default: this page's)."""
        self.server = server or self.server
        self.page.goto(self.server.url + "/")
        return self

    def _credentials(self, username, password):
        self.expect(self.by_id("auth-view")).to_be_visible(timeout=WAIT)
        self.by_id("username").fill(username)
        self.by_id("password").fill(password)

    def _signed_in(self, username):
        me = self.by_id("me")
        self.expect(me).to_have_attribute("data-user-id", re.compile(r"^\d+$"), timeout=WAIT)
        self.expect(me).to_contain_text(username, timeout=WAIT)
        self.user_id = int(me.get_attribute("data-user-id"))
        self.username = username
        return self.user_id

    def register(self, username, password=PASSWORD):
        """Register with the form (it logs in too); return the user id."""
        self._credentials(username, password)
        self.by_id("register").click()
        return self._signed_in(username)

    def login(self, username, password=PASSWORD):
        """Log in with the form; return the user id."""
        self._credentials(username, password)
        self.by_id("login").click()
        return self._signed_in(username)

    def expect_online(self, timeout=WAIT):
        self.expect(self.conn_state).to_have_text("online", timeout=timeout)
        self.expect(self.conn_state).to_have_attribute("data-state", "online", timeout=timeout)

    def open_chat(self, user_id, typed=None):
        """Open a one-to-one chat with the "New chat" form, typing ``typed``
        (a username) or else the numeric ``user_id``; wait until it is open."""
        self.by_id("new-chat-id").fill(str(user_id) if typed is None else typed)
        self.by_id("new-chat-open").click()
        self.expect_open("user", user_id)

    def expect_names(self, kind, conv_id, name):
        """The list entry and, if open, the chat title show ``name``."""
        self.expect(self.conversation(kind, conv_id).locator(".conv-name")).to_have_text(
            name, timeout=WAIT)
        if "active" in (self.conversation(kind, conv_id).get_attribute("class") or ""):
            self.expect(self.by_id("chat-title")).to_have_text(name, timeout=WAIT)

    def open_conversation(self, kind, conv_id):
        """Click a conversation of the list."""
        self.conversation(kind, conv_id).click()
        self.expect_open(kind, conv_id)

    def expect_open(self, kind, conv_id):
        self.expect(self.conversation(kind, conv_id)).to_have_class(
            re.compile(r"\bactive\b"), timeout=WAIT)
        self.expect(self.by_id("chat-main")).to_be_visible(timeout=WAIT)

    def create_group(self, name, member_ids):
        """Create a group with the sidebar form; return its id (it opens).

        ``member_ids`` are typed as given: ids or usernames."""
        self.by_id("group-name").fill(name)
        self.by_id("group-members").fill(", ".join(str(m) for m in member_ids))
        self.by_id("group-create").click()
        self.expect(self.by_id("chat-title")).to_have_text(name, timeout=WAIT)
        active = self.page.locator('#conversations .conversation.active[data-kind="group"]')
        self.expect(active).to_have_count(1, timeout=WAIT)
        return int(active.get_attribute("data-id"))

    def send(self, text):
        """Type ``text`` in the composer and press Enter (the message goes
        out, or waits as pending while offline)."""
        composer = self.by_id("composer")
        composer.fill(text)
        composer.press("Enter")
        self.expect(composer).to_have_value("", timeout=WAIT)

    def send_and_confirm(self, text):
        """Send and wait for the server's ``sent`` (status "sent")."""
        self.send(text)
        self.expect_sent(text)

    def message(self, text):
        """The message element whose body is exactly ``text``."""
        return self.messages.filter(
            has=self.page.locator(".body", has_text=re.compile("^" + re.escape(text) + "$")))

    def expect_sent(self, text, timeout=WAIT):
        msg = self.message(text)
        self.expect(msg).to_have_attribute("data-status", "sent", timeout=timeout)
        self.expect(msg).to_have_attribute("data-id", re.compile(r"^\d+$"), timeout=timeout)

    def expect_bodies(self, texts, timeout=WAIT):
        """The open conversation shows exactly these bodies, in this order."""
        self.expect(self.bodies).to_have_text(texts, timeout=timeout)

    def expect_no_errors(self):
        """No uncaught JavaScript error, and the error banner is hidden."""
        assert self.errors == [], f"JavaScript errors in the page: {self.errors}"
        self.expect(self.error).to_be_hidden(timeout=WAIT)
