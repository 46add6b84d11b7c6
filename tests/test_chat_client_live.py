"""The terminal client against a live server: real HTTP, real WebSocket."""

import io
import queue
import threading

from conftest import T
from conftest import wait_until

from imserver.chat_client import run_chat


class Lines:
    """A stdin whose lines the test feeds one at a time."""

    def __init__(self):
        self._lines = queue.Queue()

    def feed(self, line):
        self._lines.put(line + "\n")

    def end(self):
        self._lines.put("")

    def readline(self):
        # The client's input thread may outlive the test: end of input then.
        try:
            return self._lines.get(timeout=T * 4)
        except queue.Empty:
            return ""


class Screen(io.StringIO):
    """A stdout a test can read while the client writes to it."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def write(self, text):
        with self._lock:
            return super().write(text)

    def text(self):
        with self._lock:
            return self.getvalue()


def start(server, user):
    stdin, stdout = Lines(), Screen()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "status", run_chat(server.url, user.token, stdin, stdout)))
    thread.start()
    return stdin, stdout, thread, result


def test_two_terminal_clients_chat_and_get_offline_messages(live_server):
    """Offline message on connect, /to by name, replies by name, acks saved."""
    alice, bob = live_server.user(), live_server.user()
    # Bob is offline: alice's message waits in his inbox.
    status, _ = live_server.request("POST", "/api/messages",
                                    {"to": bob.id, "body": "are you there?"},
                                    token=alice.token)
    assert status == 201
    b_in, b_out, b_thread, b_result = start(live_server, bob)
    wait_until(lambda: f"{alice.name} -> me: are you there?" in b_out.text(), T * 4,
               "offline message shown")
    a_in, a_out, a_thread, a_result = start(live_server, alice)
    wait_until(lambda: "connected as" in a_out.text(), T * 4, "alice connected")
    a_in.feed(f"/to {bob.name} hello from the terminal")
    wait_until(lambda: f"{alice.name} -> me: hello from the terminal" in b_out.text(),
               T * 2, "live message shown")
    b_in.feed(f"/to {alice.name} hi alice")
    wait_until(lambda: f"{bob.name} -> me: hi alice" in a_out.text(), T * 2, "reply shown")
    # The client acked what it printed: bob's cursor reaches both entries.
    wait_until(lambda: live_server.hub.store.cursor(bob.id)[0] == 2, T * 2, "acks saved")
    a_in.feed("/quit")
    b_in.end()
    a_thread.join(T * 2)
    b_thread.join(T * 2)
    assert a_result["status"] == 0 and b_result["status"] == 0
    status, page = live_server.request("GET", f"/api/messages?with={bob.id}",
                                       token=alice.token)
    assert [m["body"] for m in page["messages"]] == [
        "are you there?", "hello from the terminal", "hi alice"]
