"""``ws.FrameSplitter``: the frames it decodes itself and the bytes it leaves
to wsproto give exactly what wsproto alone gives, however the stream is cut
into reads, and whatever a client sends (fragments, control frames between
them, binary, bad UTF-8, lengths encoded too long, unmasked frames, frames
above the limit)."""

import random

import pytest
from wsproto import ConnectionType
from wsproto import WSConnection
from wsproto.events import AcceptConnection
from wsproto.events import BytesMessage
from wsproto.events import CloseConnection
from wsproto.events import Message
from wsproto.events import Ping
from wsproto.events import Pong
from wsproto.events import Request
from wsproto.events import TextMessage

from imserver.ws import FrameSplitter

LIMIT = 1000


def pair():
    """A wsproto client and server after the handshake."""
    server, client = WSConnection(ConnectionType.SERVER), WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="localhost", target="/ws")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    return client, server


class Reader:
    """What a server made of a stream: whole messages, pings, pongs, the close."""

    def __init__(self):
        self.server = pair()[1]
        self.items = []
        self._parts = []
        self.closed = False

    def wsproto(self, data: bytes) -> None:
        if self.closed:
            return
        self.server.receive_data(data)
        for event in self.server.events():
            if isinstance(event, Message):
                self._parts.append(event.data)
                if event.message_finished:
                    kind = "text" if isinstance(event, TextMessage) else "bytes"
                    joined = "".join(self._parts) if kind == "text" else b"".join(self._parts)
                    self.items.append((kind, joined))
                    self._parts = []
            elif isinstance(event, Ping):
                self.items.append(("ping", event.payload))
            elif isinstance(event, Pong):
                self.items.append(("pong", event.payload))
            elif isinstance(event, CloseConnection):
                self.items.append(("close", event.code))
                self.closed = True
                return

    def text(self, text: str) -> None:
        assert not self.closed
        self.items.append(("text", text))


def through_wsproto(stream: bytes, cuts) -> tuple:
    reader = Reader()
    for chunk in chunks(stream, cuts):
        reader.wsproto(chunk)
    return reader.items, 0


def through_splitter(stream: bytes, cuts, limit: int = LIMIT) -> tuple:
    reader, splitter, decoded = Reader(), FrameSplitter(limit), 0
    for chunk in chunks(stream, cuts):
        for segment in splitter.feed(chunk):
            assert isinstance(segment, str) or segment, \
                "empty bytes would tell wsproto the stream ended"
            if reader.closed:
                break
            if isinstance(segment, str):
                reader.text(segment)
                decoded += 1
            else:
                reader.wsproto(segment)
        held = len(splitter._held)
        assert held <= limit + 14, "holds at most one simple frame and its header"
    return reader.items, decoded


def chunks(stream: bytes, cuts):
    start = 0
    for cut in cuts:
        if cut > start:
            yield stream[start:cut]
            start = cut
    if start < len(stream):
        yield stream[start:]


def masked(opcode_byte: int, payload: bytes, length_bytes: bytes = None) -> bytes:
    """A client frame made by hand (for what wsproto's client will not make)."""
    mask = bytes([1, 2, 3, 4])
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if length_bytes is None:
        length_bytes = bytes([0x80 | len(payload)])
    return bytes([opcode_byte]) + length_bytes + mask + body


def random_stream(rng: random.Random, client) -> bytes:
    alphabet = "ab z{}\":,é中😀"
    out = b""
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        text = "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 5, 40, 130, 400))))
        if kind < 0.5:
            out += client.send(TextMessage(data=text))
        elif kind < 0.65:
            out += client.send(TextMessage(data=text[:3], message_finished=False))
            if rng.random() < 0.5:
                out += client.send(Ping(payload=b"in between"))
            out += client.send(TextMessage(data=text[3:], message_finished=True))
        elif kind < 0.75:
            out += client.send(BytesMessage(data=text.encode()))
        elif kind < 0.85:
            out += client.send(Ping(payload=b"hi"))
        elif kind < 0.9:
            out += client.send(TextMessage(data="x" * (LIMIT + 1)))  # above the limit
        else:
            out += client.send(Pong(payload=b"p"))
    # Sometimes end with what wsproto refuses: it closes, and so must we.
    bad = rng.choice([None, None,
                      masked(0x81, b"\xff\xfe bad utf-8"),
                      masked(0x81, b"short", bytes([0x80 | 126, 0, 5])),  # 2 bytes for 5
                      bytes([0x81, 5]) + b"plain",  # not masked
                      masked(0xC1, b"rsv1 set"),
                      masked(0x80, b"continuation of nothing"),
                      masked(0x83, b"reserved opcode"),
                      masked(0x01, b"start") + masked(0x81, b"a new message inside it"),
                      masked(0x81, b"long", bytes([0x80 | 127]) + (4).to_bytes(8, "big"))])
    return out + (bad or b"")


@pytest.mark.parametrize("seed", range(300))
def test_the_splitter_gives_what_wsproto_gives_however_the_reads_fall(seed):
    rng = random.Random(seed)
    client = pair()[0]
    stream = random_stream(rng, client)
    cut_sets = [[], list(range(1, len(stream))),
                sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, 7)))]
    for cuts in cut_sets:
        expected, _ = through_wsproto(stream, cuts)
        got, _ = through_splitter(stream, cuts)
        assert got == expected, (seed, cuts)


def test_simple_text_frames_never_reach_wsproto():
    client = pair()[0]
    stream = b"".join(client.send(TextMessage(data=f'{{"type":"ping","n":{i}}}'))
                      for i in range(50))
    stream += client.send(TextMessage(data="é" * 300))  # 2-byte length, 600 bytes
    for cuts in ([], list(range(1, len(stream)))):
        items, decoded = through_splitter(stream, cuts)
        assert decoded == 51
        assert items[0] == ("text", '{"type":"ping","n":0}')
        assert items[-1] == ("text", "é" * 300)


def test_a_frame_above_the_limit_is_passed_on_as_it_arrives_not_held():
    client = pair()[0]
    big = client.send(TextMessage(data="y" * 50_000))
    splitter = FrameSplitter(LIMIT)
    passed = 0
    for start in range(0, len(big), 4096):
        for segment in splitter.feed(big[start:start + 4096]):
            assert isinstance(segment, bytes)
            passed += len(segment)
        assert len(splitter._held) < 14
    assert passed == len(big)
    # ... and the next simple frame is decoded here again.
    assert splitter.feed(client.send(TextMessage(data="after"))) == ["after"]


def test_a_hostile_length_is_passed_to_wsproto_which_refuses_it():
    header = bytes([0x81, 0x80 | 127]) + (1 << 63).to_bytes(8, "big") + b"\x00" * 4
    expected, _ = through_wsproto(header + b"x" * 100, [])
    got, decoded = through_splitter(header + b"x" * 100, [])
    assert got == expected and got[-1][0] == "close" and decoded == 0


def test_a_frame_that_trickles_in_is_appended_to_not_copied_again_on_each_read():
    """A client sending one byte at a time must not make each read copy the
    whole frame so far (quadratic work for one frame)."""
    client = pair()[0]
    frame = client.send(TextMessage(data="z" * 900))
    splitter = FrameSplitter(LIMIT)
    assert splitter.feed(frame[:20]) == []
    held = splitter._held
    for k in range(20, len(frame) - 1):
        assert splitter.feed(frame[k:k + 1]) == []
        assert splitter._held is held
    assert len(held) == len(frame) - 1
    assert splitter.feed(frame[-1:]) == ["z" * 900]
    assert splitter._held == b""
