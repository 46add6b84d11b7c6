"""The docs cite our code faithfully: cited names exist, excerpts are verbatim.

``docs/go-to-python.md`` and ``docs/architecture.md`` name our classes,
methods, modules and settings in backticks (`ConnManager.send_message`,
`set_conn`, `Hub.catch_up`, `PING_INTERVAL`, `imserver/ws.py`). Each such
name must resolve in the imserver package, so that renaming a method without
updating the docs fails here. Go names from the article and plain words
(contract terms, other tools' settings) are listed explicitly below; names
under a third-party or stdlib module (`threading.Lock`,
`simple_websocket.Server.send`) are checked by importing that module.

Every fenced ``python`` block of ``docs/go-to-python.md`` is an excerpt of
our code: it must appear verbatim (up to a uniform indentation) in the file
named in backticks on the line before the block, or in
``imserver/conn_manager.py`` when that line names none.
"""

import dataclasses
import functools
import importlib
import inspect
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import imserver
from imserver.config import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CITING_DOCS = ("go-to-python.md", "architecture.md")
EXCERPT_DOCS = ("go-to-python.md", "architecture.md")
DEFAULT_EXCERPT_SOURCE = "imserver/conn_manager.py"

# Names from the Go article and gorilla/websocket. A cited name whose first
# part is one of these (`mu.Lock`, `sync.Map`) is Go, not ours.
GO_NAMES = frozenset({
    "sync", "connMap", "connWrapper", "mu", "SetConn", "getWrapper",
    "SendMessage", "CloseAndDeleteConn", "Count", "WriteMessage",
    "SetWriteDeadline", "userId", "messageType",
})

# Backticked words that are not code of ours: the contract's frame types and
# words, other tools' names, Python keywords and built-ins.
WORDS = frozenset({
    # the contract's frame types and words
    "ready", "send", "sent", "message", "ack", "ping", "pong", "error",
    "replaced", "kicked", "seq", "connected",
    # other tools' settings and names
    "SOCK_SERVER_OPTIONS", "max_message_size", "ping_interval", "thread_class",
    "before_request", "teardown_request", "imserver_connections",
    # Python
    "None", "dict", "any", "with", "finally",
})

# Stdlib and third-party modules whose names are checked by importing them.
FOREIGN_MODULES = frozenset({
    "threading", "socket", "selectors", "queue", "concurrent", "json", "time",
    "struct", "signal", "atexit", "logging", "simple_websocket", "wsproto",
    "flask_sock", "flask", "werkzeug", "peewee", "playhouse", "itsdangerous",
    "gunicorn", "prometheus_client", "redis", "click",
})

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\(\))?")
PATH_RE = re.compile(r"[A-Za-z0-9_./-]+\.py")
FENCE_RE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
BLOCK_RE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```[ \t]*$",
                      re.MULTILINE | re.DOTALL)
SPAN_RE = re.compile(r"`([^`\n]+)`")


# -- what the imserver package defines ------------------------------------------


def _load_modules() -> dict:
    """Import every module of the package; return {short name: module}."""
    modules = {"imserver": imserver}
    for info in pkgutil.iter_modules(imserver.__path__):
        modules[info.name] = importlib.import_module(f"imserver.{info.name}")
    return modules


MODULES = _load_modules()
# Modules whose top-level and class names answer an unqualified citation. The
# terminal client is ours too, but it shares method names with the server
# (``send_message``); it answers only names qualified with ``chat_client.``.
SERVER_MODULES = {name: m for name, m in MODULES.items() if name != "chat_client"}


def _classes(modules: dict) -> dict:
    """Return {class name: [classes]} of the classes defined in ``modules``."""
    found: dict = {}
    for module in modules.values():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                found.setdefault(name, []).append(obj)
    return found


CLASSES = _classes(MODULES)
SERVER_CLASSES = _classes(SERVER_MODULES)


@functools.lru_cache(maxsize=None)
def _source(obj) -> str:
    return inspect.getsource(obj)


def _defined_at_top(module, name: str) -> bool:
    """Tell whether ``module``'s source defines ``name`` at its top level."""
    source = _source(module)
    pattern = (rf"^(?:(?:async\s+)?def|class)\s+{re.escape(name)}\b"
               rf"|^{re.escape(name)}\s*(?::[^=\n]+)?=(?!=)"
               rf"|^(?:[A-Za-z_]\w*\s*,\s*)+{re.escape(name)}\s*=")
    return re.search(pattern, source, re.MULTILINE) is not None


def _class_has(cls, attr: str) -> bool:
    """Tell whether our class ``cls`` (or an ancestor of ours) defines ``attr``.

    Counts methods and class attributes, ``__slots__``, dataclass fields, and
    instance attributes assigned as ``self.<attr> =`` in the class's source.
    """
    for klass in cls.__mro__:
        if not klass.__module__.startswith("imserver"):
            continue
        if attr in vars(klass) or attr in getattr(klass, "__slots__", ()):
            return True
        if dataclasses.is_dataclass(klass) and attr in {
                f.name for f in dataclasses.fields(klass)}:
            return True
        source = _source(klass)
        if re.search(rf"\bself\.{re.escape(attr)}\s*(?::[^=\n]+)?=(?!=)", source):
            return True
    return False


def _walk(obj, attrs: list) -> bool:
    """Follow ``attrs`` from ``obj`` (a module, one of our classes, anything)."""
    for i, attr in enumerate(attrs):
        if inspect.isclass(obj) and obj.__module__.startswith("imserver"):
            if not _class_has(obj, attr):
                return False
            # A member of our class: follow it only if it is itself a class.
            value = inspect.getattr_static(obj, attr, None)
            if i == len(attrs) - 1:
                return True
            if not inspect.isclass(value):
                return False
            obj = value
            continue
        if inspect.ismodule(obj) and not hasattr(obj, attr):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{attr}")
            except ImportError:
                return False
            continue
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def resolves(name: str) -> bool:
    """Tell whether a cited name exists: ours, or in a foreign module."""
    if name.endswith(".py"):
        return (ROOT / name).is_file() or (ROOT / "imserver" / name).is_file()
    name = name.removesuffix("()")
    parts = name.split(".")
    head, rest = parts[0], parts[1:]
    if head in FOREIGN_MODULES:
        try:
            module = importlib.import_module(head)
        except ImportError:
            return False
        return _walk(module, rest)
    if head == "imserver" and rest and rest[0] in MODULES:
        head, rest = rest[0], rest[1:]
    if not rest:
        return _plain_name_exists(head)
    if head in MODULES:
        module = MODULES[head]
        if not (_defined_at_top(module, rest[0]) or hasattr(module, rest[0])):
            return False
        return _walk(module, rest)
    return any(_walk(cls, rest) for cls in CLASSES.get(head, ()))


def _plain_name_exists(name: str) -> bool:
    """Tell whether a bare name is a module, top-level name, member or setting."""
    if name in MODULES:
        return True
    if name in DEFAULTS or name.removeprefix("IMSERVER_") in DEFAULTS:
        return True
    if any(_defined_at_top(module, name) for module in SERVER_MODULES.values()):
        return True
    return any(_class_has(cls, name)
               for classes in SERVER_CLASSES.values() for cls in classes)


# -- what the docs cite -----------------------------------------------------------


def _without_code_blocks(text: str) -> str:
    return FENCE_RE.sub("", text)


def cited_names(text: str) -> list[str]:
    """Return the backticked spans of ``text`` (outside code blocks) that are names."""
    names = []
    for span in SPAN_RE.findall(_without_code_blocks(text)):
        span = span.strip()
        if PATH_RE.fullmatch(span) or NAME_RE.fullmatch(span):
            names.append(span)
    return names


def is_exempt(name: str) -> bool:
    """Tell whether a cited name is Go, or a word that is not our code."""
    return name in WORDS or name.removesuffix("()").split(".")[0] in GO_NAMES


def _doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _citations():
    for doc in CITING_DOCS:
        for name in sorted(set(cited_names(_doc(doc)))):
            if not is_exempt(name):
                yield doc, name


CITATIONS = list(_citations())


@pytest.mark.parametrize("doc", CITING_DOCS)
def test_doc_cites_many_names_of_ours(doc):
    """Each doc cites dozens of checked names, so the parser did not miss them."""
    assert len([d for d, _ in CITATIONS if d == doc]) >= 40


@pytest.mark.parametrize("doc,name", CITATIONS, ids=[f"{d}:{n}" for d, n in CITATIONS])
def test_cited_name_exists(doc, name):
    """A name cited in backticks resolves in imserver (or its foreign module)."""
    assert resolves(name), f"{doc} cites `{name}`, which does not exist"


def test_key_names_of_the_go_port_are_cited_and_checked():
    """The guide cites the port's main names, and they are not exempted."""
    cited = {name for doc, name in CITATIONS if doc == "go-to-python.md"}
    for name in ("ConnManager.set_conn", "ConnManager._get_wrapper",
                 "ConnManager.send_message", "ConnManager.close_and_delete_conn",
                 "ConnManager.count", "ConnManager.send_many",
                 "ConnManager.send_entries", "ConnWrapper.lock", "BufferedSocket",
                 "Hub.catch_up", "Heartbeat"):
        assert name in cited, name


def test_a_renamed_name_would_fail():
    """Every cited name of ours stops resolving when its last part changes."""
    ours = {name for _, name in CITATIONS
            if not name.endswith(".py") and name.split(".")[0] not in FOREIGN_MODULES}
    assert ours
    for name in ours:
        renamed = name.removesuffix("()") + "_renamed"
        assert not resolves(renamed), f"`{renamed}` resolves: the check is too loose"


def test_resolver_rejects_what_does_not_exist():
    """Qualified names are checked against the right module or class."""
    assert resolves("ConnManager.send_message")
    assert resolves("ConnWrapper.lock")
    assert resolves("BufferedSocket._out")
    assert resolves("imserver/transport.py")
    assert resolves("simple_websocket.ws.Base._thread")
    assert not resolves("ConnWrapper.send_message")
    assert not resolves("ws.receive")
    assert not resolves("simple_websocket.Server.send_message")
    assert not resolves("imserver/nothing.py")
    assert not resolves("SetConn")
    assert is_exempt("mu.Lock()") and is_exempt("sync.Map")
    assert not is_exempt("threading.Lock") and not is_exempt("ws.websocket")


# -- excerpts of our code ----------------------------------------------------------


def excerpts(text: str):
    """Yield ``(source path, code)`` of every fenced python block of ``text``."""
    for match in BLOCK_RE.finditer(text):
        if match.group("info").strip().split(" ")[0] != "python":
            continue
        before = text[:match.start()].rstrip("\n").splitlines()
        caption = before[-1] if before else ""
        named = re.findall(r"`(imserver/[A-Za-z0-9_/]+\.py)`", caption)
        yield (named[0] if named else DEFAULT_EXCERPT_SOURCE), match.group("body")


def appears_verbatim(code: str, source: str) -> bool:
    """Tell whether ``code`` is a run of ``source``'s lines, up to a uniform indent."""
    lines = textwrap.dedent(code).splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return False
    src = source.splitlines()
    first = lines[0]
    for i, line in enumerate(src):
        if not line.endswith(first):
            continue
        indent = line[:len(line) - len(first)]
        if indent.strip() or i + len(lines) > len(src):
            continue
        if all((not want.strip() and not have.strip()) or have == indent + want
               for want, have in zip(lines, src[i:i + len(lines)])):
            return True
    return False


EXCERPTS = [(doc, path, code) for doc in EXCERPT_DOCS
            for path, code in excerpts(_doc(doc))]


def test_guide_quotes_our_code():
    """The guide has excerpts, most of them from conn_manager.py."""
    paths = [path for doc, path, _ in EXCERPTS if doc == "go-to-python.md"]
    assert len(paths) >= 8
    assert paths.count(DEFAULT_EXCERPT_SOURCE) >= 6


@pytest.mark.parametrize("doc,path,code", EXCERPTS,
                         ids=[f"{d}:{p}:{i}" for i, (d, p, _) in enumerate(EXCERPTS)])
def test_excerpt_is_verbatim(doc, path, code):
    """A python block of the docs appears as is in the file it names."""
    source = (ROOT / path).read_text(encoding="utf-8")
    assert appears_verbatim(code, source), (
        f"{doc}: this excerpt is not in {path} any more:\n{code}")


def test_verbatim_check_catches_an_edit():
    """Changing one character, or the relative indentation, breaks an excerpt."""
    source = "class A:\n    def f(self):\n        if x:\n            return 1\n"
    assert appears_verbatim("if x:\n    return 1\n", source)
    assert not appears_verbatim("if x:\n    return 2\n", source)
    assert not appears_verbatim("if x:\n        return 1\n", source)
