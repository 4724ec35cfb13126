"""The wire codec against PROTOCOL.md version 2, section 1 (framing 1.1, packet
types 1.2, errors 1.6), and the byte budgets of the contract measured on what the
server sends.

Decisions pinned here beyond the contract's letter: fields past the known ones are
ignored; an int field is a non-bool MessagePack int in 0..2**63-1; bin fields have
exact lengths; a no-field body may be empty (n == 1) or an empty array; a length
prefix above ``max_frame`` raises ``FrameTooLarge`` as soon as the prefix (even an
incomplete one whose value already exceeds the limit) is read; more than 5 prefix
bytes and n == 0 are ``MalformedFrame``; ``encode`` leaves out trailing ``None``
optional fields (an unset optional field followed by a set one is nil); ONLINE's
body is the array of uids itself, the empty array when there are none (an empty
body is read as none too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from im58d.wire import (
    DEFAULT_MAX_FRAME,
    Decoder,
    FrameTooLarge,
    MalformedFrame,
    WireError,
    decode_body,
    encode,
    frame,
    varint,
)
from im58d.wire import packets as P

from .support import Harness, add_user, resume_for

# No deadline and no "too slow" health check: on a loaded CI machine data
# generation may be slow, which says nothing about the codec.
HYPOTHESIS = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

UINT_MAX = 2**63 - 1
TS = 1_800_000_000  # a realistic Unix time (2027), a uint32 in MessagePack: 0xce + 4 bytes
TS_BYTES = b"\xce\x6b\x49\xd2\x00"  # 1_800_000_000 == 0x6B49D200

SID = bytes(range(16))
KEY = bytes(range(100, 132))
NONCE = b"n" * 8
MAC = b"m" * 16
DEV = b"d" * 16  # a device id


# --- helpers -------------------------------------------------------------------


class Outcome(NamedTuple):
    """What a decoder made of a byte stream: the packets, then the error code if any."""

    packets: list[Any]
    code: int | None


def typed(packets: Sequence[Any]) -> list[Any]:
    """Packets with their classes and field types, for comparisons.

    NamedTuples compare as plain tuples, so ``Ping() == Pong()``,
    ``AckR(5) == AckA(5)`` and ``Presence(1, True) == Presence(1, 1)``; this
    representation tells them apart.
    """
    return [(type(p), tuple((type(f), f) for f in p)) for p in packets]


def run(chunks: Sequence[bytes], max_frame: int = DEFAULT_MAX_FRAME) -> Outcome:
    """Feed ``chunks`` one by one to a fresh decoder, collecting packets up to an error.

    Any exception other than ``WireError`` propagates (and fails the test).
    """
    decoder = Decoder(max_frame)
    out: list[Any] = []
    for chunk in chunks:
        try:
            for packet in decoder.feed(chunk):
                out.append(packet)
        except WireError as e:
            return Outcome(out, e.code)
    return Outcome(out, None)


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> list[Any]:
    """The packets of ``data`` fed whole; the stream must end on a frame boundary."""
    decoder = Decoder(max_frame)
    packets = list(decoder.feed(data))
    assert decoder.buffered == 0, decoder.buffered
    return packets


def error_of(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> WireError | None:
    """The ``WireError`` raised while decoding ``data`` fed whole, or None."""
    try:
        list(Decoder(max_frame).feed(data))
    except WireError as e:
        return e
    return None


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, repeats give empty chunks)."""
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def raw_frame(type_: int, body: bytes) -> bytes:
    """A frame with an arbitrary (possibly invalid) body."""
    return varint(len(body) + 1) + bytes((type_,)) + body


uints = st.integers(min_value=0, max_value=UINT_MAX)
texts = st.text(max_size=40)
bodies = texts | st.binary(max_size=40)


def bins(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


PACKET_STRATEGIES: dict[int, st.SearchStrategy[Any]] = {
    P.LOGIN: st.builds(P.Login, texts, texts, bins(16), st.none() | texts, st.none() | texts),
    P.WELCOME: st.builds(
        P.Welcome, uints, bins(16), bins(32), texts, uints, uints, uints, uints, uints, uints
    ),
    P.RESUME: st.builds(P.Resume, bins(16), uints, bins(8), bins(16)),
    P.RESUMED: st.builds(P.Resumed, uints, uints, uints, uints),
    P.PING: st.just(P.Ping()),
    P.PONG: st.just(P.Pong()),
    P.BYE: st.just(P.Bye()),
    P.KICKED: st.builds(P.Kicked, uints),
    P.ERROR: st.builds(P.Error, uints, texts, st.none() | uints),
    P.MSG_R: st.builds(P.MsgR, uints, uints, bodies, st.none() | uints),
    P.MSG_A: st.builds(P.MsgA, uints, uints, uints),
    P.MSG_N: st.builds(
        P.MsgN, uints, uints, uints, bodies, uints, st.none() | uints, st.none() | uints
    ),
    P.ACK_R: st.builds(P.AckR, uints),
    P.ACK_A: st.builds(P.AckA, uints),
    P.ACK_N: st.builds(P.AckN, uints),
    P.PRESENCE: st.builds(P.Presence, uints, st.booleans()),
    P.CHANGED: st.builds(
        P.Changed,
        st.sampled_from(["friends", "groups", "categories", "requests", "devices"]),
        uints,
    ),
    P.ONLINE: st.builds(P.Online, st.lists(uints, max_size=20).map(tuple)),
}

valid_packets = st.one_of(*PACKET_STRATEGIES.values())

# Pieces of hostile streams: valid frames, random bytes, and short sequences that
# steer the decoder into its edge cases (long prefixes, n == 0, unknown types).
stream_pieces = st.one_of(
    valid_packets.map(encode),
    st.binary(max_size=24),
    st.sampled_from(
        [
            b"\x00",
            b"\x01\x05",
            b"\x80",
            b"\xff\xff\xff",
            b"\x80\x80\x80\x80",
            b"\x81\x80\x80\x80\x00",
            b"\x02\x30\x90",
            b"\x02\x13\xc1",
            b"\x03\x13\x91\xc3",
            b"\x01\x22",
            b"\x02\x22\x90",
            b"\x03\x22\x91\xff",
        ]
    ),
)
hostile_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(stream_pieces, max_size=8).map(b"".join),
)
max_frames = st.sampled_from([1, 8, 100, 300, DEFAULT_MAX_FRAME])


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


# A sample of every packet type, with and without its optional fields.
SAMPLES: dict[int, list[Any]] = {
    P.LOGIN: [
        P.Login("alice", "secret", DEV),
        P.Login("alice", "pw", DEV, "Alice's phone"),
        P.Login("alice", "pw", DEV, "pc", "im58/2.0"),
        P.Login("alice", "pw", DEV, None, "im58/2.0"),  # a client without a name
    ],
    P.WELCOME: [P.Welcome(7, SID, KEY, "tok", 0, 240, 300, 3, 0, 0),
                P.Welcome(7, SID, KEY, "tok", 90, 240, 300, 3, 41, 88)],
    P.RESUME: [P.Resume(SID, TS, NONCE, MAC)],
    P.RESUMED: [P.Resumed(7, 12, 3, 0), P.Resumed(7, 12, 3, 11)],
    P.PING: [P.Ping()],
    P.PONG: [P.Pong()],
    P.BYE: [P.Bye()],
    P.KICKED: [P.Kicked(P.KICKED_REPLACED), P.Kicked(P.KICKED_DISABLED)],
    P.ERROR: [P.Error(401, "not logged in"), P.Error(404, "no such user", 9)],
    P.MSG_R: [
        P.MsgR(1, 2, "你好"),
        P.MsgR(1, 2, b"\x00\xff", P.KIND_USER),
        P.MsgR(3, 4, "hi", P.KIND_GROUP),
    ],
    P.MSG_A: [P.MsgA(1, 10, 3)],
    P.MSG_N: [
        P.MsgN(5, 10, 1, "你好", TS),
        P.MsgN(6, 11, 1, b"\x01", TS, 4),  # to a group
        P.MsgN(7, 12, 1, "hi", TS, None, 2),  # the sender's own, on its other devices
    ],
    P.ACK_R: [P.AckR(5)],
    P.ACK_A: [P.AckA(5)],
    P.ACK_N: [P.AckN(1)],
    P.PRESENCE: [P.Presence(7, True), P.Presence(7, False)],
    P.CHANGED: [P.Changed("friends", 3), P.Changed("requests", 2), P.Changed("devices", 9)],
    P.ONLINE: [P.Online(), P.Online((7,)), P.Online((2, 3, 500, UINT_MAX))],
}


# --- encoding and round trips ----------------------------------------------------


class RoundTripTests(SynchronousTestCase):
    def test_samples_cover_every_packet_type(self) -> None:
        """The samples and the hypothesis strategies cover exactly the types of SPECS."""
        self.assertEqual(set(SAMPLES), set(P.SPECS))
        self.assertEqual(set(PACKET_STRATEGIES), set(P.SPECS))
        for type_, samples in SAMPLES.items():
            for packet in samples:
                self.assertIs(type(packet), P.SPECS[type_][0])

    def test_every_sample_round_trips(self) -> None:
        """Every packet type, with and without optional fields, encodes to a frame
        of its type byte and decodes back to the same packet (class and field types)."""
        for type_, samples in SAMPLES.items():
            for packet in samples:
                data = encode(packet)
                n = len(data) - 1
                self.assertLess(n, 0x80, packet)
                self.assertEqual(data[0], n, packet)
                self.assertEqual(data[1], type_, packet)
                self.assertEqual(typed(decode_all(data)), typed([packet]))

    def test_optional_fields_left_out_when_none(self) -> None:
        """Trailing None optional fields are not on the wire; set ones are."""
        self.assertEqual(encode(P.MsgR(1, 2, "x")), frame(P.MSG_R, [1, 2, "x"]))
        self.assertEqual(encode(P.MsgR(1, 2, "x", 0)), frame(P.MSG_R, [1, 2, "x", 0]))
        self.assertEqual(encode(P.Login("u", "p", DEV)), frame(P.LOGIN, ["u", "p", DEV]))
        self.assertEqual(
            encode(P.Login("u", "p", DEV, "n")), frame(P.LOGIN, ["u", "p", DEV, "n"])
        )
        self.assertEqual(encode(P.Error(400, "bad")), frame(P.ERROR, [400, "bad"]))
        self.assertEqual(encode(P.MsgN(1, 2, 3, "b", TS)), frame(P.MSG_N, [1, 2, 3, "b", TS]))
        body = encode(P.MsgN(1, 2, 3, "b", TS, 8))[2:]
        self.assertEqual(msgpack.unpackb(body), [1, 2, 3, "b", TS, 8])

    def test_unset_optional_field_before_a_set_one_is_nil(self) -> None:
        """An optional field followed by a present one goes as nil: MSG_N with
        ``to`` and no ``group``, LOGIN with ``client`` and no device name."""
        body = encode(P.MsgN(1, 2, 3, "b", TS, None, 9))[2:]
        self.assertEqual(msgpack.unpackb(body), [1, 2, 3, "b", TS, None, 9])
        body = encode(P.Login("u", "p", DEV, None, "app/2"))[2:]
        self.assertEqual(msgpack.unpackb(body), ["u", "p", DEV, None, "app/2"])

    def test_no_field_packets_have_empty_body(self) -> None:
        """PING, PONG and BYE are a bare type byte: n == 1, no MessagePack at all."""
        self.assertEqual(encode(P.Ping()), b"\x01\x05")
        self.assertEqual(encode(P.Pong()), b"\x01\x06")
        self.assertEqual(encode(P.Bye()), b"\x01\x07")
        self.assertEqual(frame(P.PING, []), b"\x01\x05")
        self.assertEqual(frame(P.PING, ()), b"\x01\x05")

    def test_no_field_packet_accepts_empty_array_and_extra_fields(self) -> None:
        """A no-field packet decodes from an empty body, an empty array, or an array
        with fields this version does not know."""
        for data in (b"\x01\x05", b"\x02\x05\x90", b"\x04\x05\x92\x01\xa0"):
            self.assertEqual(typed(decode_all(data)), typed([P.Ping()]), data)

    def test_byte_exact_frames(self) -> None:
        """Frames computed by hand from the contract: varint(n) ‖ type ‖ msgpack array,
        ints and strs in their smallest MessagePack encoding."""
        nihao = "你好".encode()
        self.assertEqual(len(nihao), 6)
        cases: list[tuple[Any, bytes]] = [
            (P.Ping(), b"\x01\x05"),
            # n = 11: type + fixarray(3) + 1 + 2 + fixstr(6) "你好"
            (P.MsgR(1, 2, "你好"), b"\x0b\x10\x93\x01\x02\xa6" + nihao),
            # bin body: bin8 marker 0xc4 and length
            (P.MsgR(1, 2, b"\x00\xff"), b"\x08\x10\x93\x01\x02\xc4\x02\x00\xff"),
            (P.MsgR(1, 2, "x", 1), b"\x07\x10\x94\x01\x02\xa1x\x01"),
            # MSG_A [cmid, msg_id, seq]: the sender's seq, no ts any more
            (P.MsgA(1, 7, 3), b"\x05\x11\x93\x01\x07\x03"),
            # device_id is bin8 of 16 bytes: 0xc4 0x10
            (P.Login("a", "b", DEV), b"\x18\x01\x93\xa1a\xa1b\xc4\x10" + DEV),
            (
                P.Login("a", "b", DEV, "n", "c"),
                b"\x1c\x01\x95\xa1a\xa1b\xc4\x10" + DEV + b"\xa1n\xa1c",
            ),
            (P.Presence(3, True), b"\x04\x20\x92\x03\xc3"),
            (P.Presence(3, False), b"\x04\x20\x92\x03\xc2"),
            # 404 is uint16 (0xcd 0x01 0x94); 12-byte fixstr; ref 42 a positive fixint
            (P.Error(404, "no such user", 42), b"\x13\x0f\x93\xcd\x01\x94\xacno such user\x2a"),
            (P.AckR(300), b"\x05\x13\x91\xcd\x01\x2c"),
            (P.Kicked(2), b"\x03\x08\x91\x02"),
            (
                P.Resumed(UINT_MAX, 0, 127, 5),
                b"\x0e\x04\x94\xcf\x7f" + b"\xff" * 7 + b"\x00\x7f\x05",
            ),
            (  # n = 1 + fixarray + 1 + (2 + 16) + (2 + 32) + 2 + 1 + 2 + 3 + 1 + 1 + 1 = 66
                P.Welcome(7, SID, KEY, "t", 0, 240, 300, 3, 9, 0),
                b"\x42\x02\x9a\x07\xc4\x10" + SID + b"\xc4\x20" + KEY
                + b"\xa1t\x00\xcc\xf0\xcd\x01\x2c\x03\x09\x00",
            ),
            (P.AckN(9), b"\x03\x15\x91\x09"),
            (P.MsgN(1, 2, 3, "x", 4, None, 5), b"\x0a\x12\x97\x01\x02\x03\xa1x\x04\xc0\x05"),
            # ONLINE: the array of uids; none is the empty array, not an empty body
            (P.Online(), b"\x02\x22\x90"),
            (P.Online((3, 300)), b"\x06\x22\x92\x03\xcd\x01\x2c"),
            (  # n = 1 + fixarray + (2 + 16) + 5 + (2 + 8) + (2 + 16) = 53
                P.Resume(SID, TS, NONCE, MAC),
                b"\x35\x03\x94\xc4\x10" + SID + TS_BYTES + b"\xc4\x08" + NONCE + b"\xc4\x10" + MAC,
            ),
        ]
        for packet, expected in cases:
            self.assertEqual(encode(packet), expected, packet)
            self.assertEqual(typed(decode_all(expected)), typed([packet]))

    def test_six_packets_of_a_message_total_48_bytes(self) -> None:
        """The six packets of section 1.4 for the 6-byte text "你好" with small ids,
        seqs and a ts near 1.8e9 take 12 + 6 + 18 + 4 + 4 + 4 = 48 bytes on the wire
        (53 in version 1: MSG_A carried the ts, ACK_N two fields)."""
        six: list[P.Packet] = [
            P.MsgR(1, 2, "你好"),  # A -> server
            P.MsgA(1, 10, 1),  # server -> A: [cmid, msg_id, seqA]
            P.MsgN(5, 10, 1, "你好", TS),  # server -> B
            P.AckR(5),  # B -> server
            P.AckA(5),  # server -> B
            P.AckN(1),  # server -> A: [seqA]
        ]
        frames = [encode(p) for p in six]
        self.assertEqual([len(f) for f in frames], [12, 6, 18, 4, 4, 4])
        self.assertEqual(sum(len(f) for f in frames), 48)
        nihao = "你好".encode()
        self.assertEqual(
            frames[2], b"\x11\x12\x95\x05\x0a\x01\xa6" + nihao + TS_BYTES
        )  # MSG_N [seq, msg_id, from, body, ts]
        self.assertEqual(frames[5], b"\x03\x15\x91\x01")
        self.assertEqual(typed(decode_all(b"".join(frames))), typed(six))

    def test_varint(self) -> None:
        """varint is unsigned LEB128, low group first, high bit = more."""
        cases = {
            0: b"\x00",
            1: b"\x01",
            127: b"\x7f",
            128: b"\x80\x01",
            206: b"\xce\x01",
            16383: b"\xff\x7f",
            16384: b"\x80\x80\x01",
            20007: b"\xa7\x9c\x01",
            65536: b"\x80\x80\x04",
            2**35 - 1: b"\xff\xff\xff\xff\x7f",
        }
        for n, expected in cases.items():
            self.assertEqual(varint(n), expected, n)

    def test_two_byte_prefix(self) -> None:
        """A frame with 128 <= n < 16384 has a 2-byte prefix (n = 206 here)."""
        packet = P.MsgR(1, 2, "a" * 200)
        # body: fixarray(3) 1 2 str8(200) = 1 + 1 + 1 + 2 + 200 = 205; n = 206
        expected = b"\xce\x01\x10\x93\x01\x02\xd9\xc8" + b"a" * 200
        self.assertEqual(encode(packet), expected)
        self.assertEqual(typed(decode_all(expected)), typed([packet]))

    def test_three_byte_prefix(self) -> None:
        """A frame with 16384 <= n <= 65536 has a 3-byte prefix (n = 20007 here)."""
        packet = P.MsgR(1, 2, "a" * 20000)
        # body: fixarray(3) 1 2 str16(20000 = 0x4e20) = 3 + 3 + 20000 = 20006; n = 20007
        expected = b"\xa7\x9c\x01\x10\x93\x01\x02\xda\x4e\x20" + b"a" * 20000
        self.assertEqual(encode(packet), expected)
        self.assertEqual(typed(decode_all(expected)), typed([packet]))

    def test_largest_frame_is_accepted(self) -> None:
        """n == max_frame (65,536 by default) is accepted; the limit is inclusive."""
        packet = P.MsgR(1, 2, "a" * 65529)  # body 6 + 65529 = 65535 bytes, n = 65536
        data = encode(packet)
        self.assertEqual(data[:3], b"\x80\x80\x04")
        self.assertEqual(typed(decode_all(data)), typed([packet]))
        small = frame(P.MSG_R, [1, 2, "a" * 94])  # n = 1 + 5 + 94 = 100
        self.assertEqual(small[0], 100)
        self.assertEqual(typed(decode_all(small, 100)), typed([P.MsgR(1, 2, "a" * 94)]))

    def test_five_byte_prefix_is_accepted(self) -> None:
        """A 5-byte length prefix (here a non-minimal encoding of n = 1) is within the
        contract's limit and is accepted."""
        self.assertEqual(typed(decode_all(b"\x81\x80\x80\x80\x00\x05")), typed([P.Ping()]))

    def test_uint_range(self) -> None:
        """Int fields take 0 and 2**63 - 1 (MessagePack uint64)."""
        for value in (0, 127, 128, 2**32, UINT_MAX):
            self.assertEqual(typed(decode_all(frame(P.ACK_R, [value]))), typed([P.AckR(value)]))

    def test_fields_past_the_known_ones_are_ignored(self) -> None:
        """Forward compatibility: a newer peer may append fields of any type."""
        cases: list[tuple[bytes, Any]] = [
            (frame(P.ACK_R, [5, "future", 7]), P.AckR(5)),
            (frame(P.MSG_R, [1, 2, "x", 1, {"z": [1.5, None]}]), P.MsgR(1, 2, "x", 1)),
            (frame(P.PRESENCE, [1, True, -1]), P.Presence(1, True)),
            (
                frame(P.WELCOME, [7, SID, KEY, "t", 0, 240, 300, 3, 4, 5, b"new"]),
                P.Welcome(7, SID, KEY, "t", 0, 240, 300, 3, 4, 5),
            ),
            (frame(P.LOGIN, ["u", "p", DEV, "n", "c", {"x": 1}]), P.Login("u", "p", DEV, "n", "c")),
            (frame(P.ACK_N, [7, 10]), P.AckN(7)),  # version 1's [cmid, msg_id] reads as [7]
        ]
        for data, expected in cases:
            self.assertEqual(typed(decode_all(data)), typed([expected]), data)

    def test_msgpack_encodings_are_read_leniently(self) -> None:
        """A decoder reads any valid MessagePack encoding of a field, not only the
        smallest one (str8 for a short str, uint64 for a small int, array16)."""
        body = b"\xdc\x00\x02" + b"\xd9\x07friends" + b"\xcf" + (3).to_bytes(8, "big")
        self.assertEqual(
            typed(decode_all(raw_frame(P.CHANGED, body))), typed([P.Changed("friends", 3)])
        )

    def test_decode_body(self) -> None:
        """decode_body maps one frame's type and body to a packet."""
        self.assertEqual(typed([decode_body(P.ACK_N, b"\x91\x01")]), typed([P.AckN(1)]))
        self.assertEqual(typed([decode_body(P.BYE, b"")]), typed([P.Bye()]))
        self.assertEqual(
            typed([decode_body(P.ONLINE, b"\x92\x01\x02")]), typed([P.Online((1, 2))])
        )
        self.assertEqual(decode_body(0x7F, b"\xc1"), P.UnknownPacket(0x7F, b"\xc1"))
        self.assertRaises(MalformedFrame, decode_body, P.ACK_N, b"\x90")

    def test_online(self) -> None:
        """ONLINE's body is the array of uids itself: none is the MessagePack empty
        array (n == 2), not an empty body; any number of uids round-trips; an empty
        body is read as none too (lenient)."""
        self.assertEqual(encode(P.Online()), b"\x02\x22\x90")
        self.assertEqual(encode(P.Online(())), b"\x02\x22\x90")
        self.assertEqual(typed(decode_all(b"\x02\x22\x90")), typed([P.Online(())]))
        self.assertEqual(typed(decode_all(b"\x01\x22")), typed([P.Online(())]))
        self.assertEqual(encode(P.Online((1,))), b"\x03\x22\x91\x01")
        for uids in ((5, 3, 1), tuple(range(1, 20)), tuple(range(1000, 1300))):
            data = encode(P.Online(uids))
            self.assertEqual(msgpack.unpackb(data[len(varint(len(data))) + 1:]), list(uids))
            self.assertEqual(typed(decode_all(data)), typed([P.Online(uids)]))


# --- streaming -------------------------------------------------------------------


class StreamTests(SynchronousTestCase):
    def test_byte_by_byte(self) -> None:
        """Frames fed one byte at a time decode to the same packets, each as soon as
        its last byte arrives."""
        packets = [p for samples in SAMPLES.values() for p in samples]
        data = b"".join(encode(p) for p in packets)
        decoder = Decoder()
        got: list[Any] = []
        for i in range(len(data)):
            got.extend(decoder.feed(data[i : i + 1]))
        self.assertEqual(typed(got), typed(packets))
        self.assertEqual(decoder.buffered, 0)

    def test_buffered_reports_incomplete_frame(self) -> None:
        """Decoder.buffered is the number of bytes held of an incomplete frame,
        prefix included, and 0 once it completes."""
        data = encode(P.MsgR(1, 2, "a" * 20000))
        decoder = Decoder()
        self.assertEqual(decoder.buffered, 0)
        self.assertEqual(list(decoder.feed(data[:2])), [])
        self.assertEqual(decoder.buffered, 2)  # an incomplete prefix
        self.assertEqual(list(decoder.feed(data[2:3])), [])
        self.assertEqual(decoder.buffered, 3)  # the whole prefix
        self.assertEqual(list(decoder.feed(data[3:1000])), [])
        self.assertEqual(decoder.buffered, 1000)
        ping = encode(P.Ping())
        got = list(decoder.feed(data[1000:] + ping + ping[:1]))
        self.assertEqual(typed(got), typed([P.MsgR(1, 2, "a" * 20000), P.Ping()]))
        self.assertEqual(decoder.buffered, 1)  # the next frame's prefix
        self.assertEqual(typed(list(decoder.feed(ping[1:]))), typed([P.Ping()]))
        self.assertEqual(decoder.buffered, 0)

    def test_empty_feed(self) -> None:
        """Feeding no bytes yields nothing and changes nothing."""
        decoder = Decoder()
        self.assertEqual(list(decoder.feed(b"")), [])
        self.assertEqual(list(decoder.feed(b"\x0b\x10")), [])
        self.assertEqual(list(decoder.feed(b"")), [])
        self.assertEqual(decoder.buffered, 2)

    def test_unknown_type_then_next_frame(self) -> None:
        """An unknown type byte yields UnknownPacket(type, raw body) without looking
        at the body, and decoding continues with the next frame."""
        data = (
            raw_frame(0x30, b"\xc1garbage")
            + b"\x01\x7e"
            + encode(P.AckR(5))
            + raw_frame(0xFF, b"\x90")
        )
        got = decode_all(data)
        self.assertEqual(
            typed(got),
            typed(
                [
                    P.UnknownPacket(0x30, b"\xc1garbage"),
                    P.UnknownPacket(0x7E, b""),
                    P.AckR(5),
                    P.UnknownPacket(0xFF, b"\x90"),
                ]
            ),
        )

    @HYPOTHESIS
    @given(st.data(), st.lists(valid_packets, max_size=12))
    def test_valid_packets_in_any_chunking(self, data: st.DataObject, packets: list[Any]) -> None:
        """Property: any list of valid packets, encoded, concatenated and fed in random
        chunks, decodes to exactly that list, leaving nothing buffered."""
        stream = b"".join(encode(p) for p in packets)
        chunks = split(stream, data.draw(cuts_for(stream), label="cuts"))
        decoder = Decoder()
        got: list[Any] = []
        for chunk in chunks:
            got.extend(decoder.feed(chunk))
        self.assertEqual(typed(got), typed(packets))
        self.assertEqual(decoder.buffered, 0)

    @HYPOTHESIS
    @given(st.data(), hostile_streams, max_frames)
    def test_any_bytes_only_wire_errors_whatever_the_chunking(
        self, data: st.DataObject, stream: bytes, max_frame: int
    ) -> None:
        """Property: any byte string, fed whole or in any chunking, yields packets and
        at most one WireError, never another exception; the packets before the error
        (or the end) and the error's code are the same whatever the chunking; the
        decoder never holds more than one frame; after an error it raises again."""
        cuts = data.draw(cuts_for(stream), label="cuts")
        whole = run([stream], max_frame)
        chunked_decoder = Decoder(max_frame)
        got: list[Any] = []
        code: int | None = None
        for chunk in split(stream, cuts):
            try:
                for packet in chunked_decoder.feed(chunk):
                    got.append(packet)
            except WireError as e:
                code = e.code
                self.assertIn(code, (400, 413))
                self.assertEqual(chunked_decoder.buffered, 0)
                break
            self.assertLessEqual(chunked_decoder.buffered, 5 + max_frame)
        self.assertEqual(typed(got), typed(whole.packets))
        self.assertEqual(code, whole.code)
        for packet in got:
            self.assertIsInstance(packet, (*P.TYPE_OF, P.UnknownPacket))
        if code is not None:
            try:
                list(chunked_decoder.feed(encode(P.Ping())))
            except WireError as e:
                self.assertEqual(e.code, code)
            else:
                self.fail("the decoder accepted bytes after an error")


# --- errors --------------------------------------------------------------------


class ErrorTests(SynchronousTestCase):
    def assertMalformed(self, data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        error = error_of(data, max_frame)
        self.assertIsInstance(error, MalformedFrame, data)
        assert error is not None
        self.assertEqual(error.code, 400)

    def assertTooLarge(self, decoder: Decoder, data: bytes) -> None:
        try:
            list(decoder.feed(data))
        except FrameTooLarge as e:
            self.assertEqual(e.code, 413)
            self.assertIsInstance(e, WireError)
        else:
            self.fail(f"no FrameTooLarge for {data!r}")
        self.assertEqual(decoder.buffered, 0)

    def test_error_classes(self) -> None:
        """MalformedFrame is 400 and FrameTooLarge is 413, both WireErrors."""
        self.assertTrue(issubclass(MalformedFrame, WireError))
        self.assertTrue(issubclass(FrameTooLarge, WireError))
        self.assertEqual(MalformedFrame.code, 400)
        self.assertEqual(FrameTooLarge.code, 413)

    def test_oversized_prefix_before_body(self) -> None:
        """A prefix of n = max_frame + 1 raises 413 as soon as the prefix is read,
        with none of the frame's type or body sent, and nothing is buffered."""
        self.assertEqual(DEFAULT_MAX_FRAME, 65536)
        self.assertTooLarge(Decoder(), varint(65537))  # b"\x81\x80\x04"
        self.assertTooLarge(Decoder(), varint(2**35 - 1))
        self.assertTooLarge(Decoder(100), b"\x65")  # n = 101, a 1-byte prefix
        self.assertTooLarge(Decoder(100), varint(200))
        self.assertTooLarge(Decoder(65535), varint(65536))

    def test_oversized_prefix_in_pieces(self) -> None:
        """A prefix that arrives byte by byte raises 413 at the byte that settles it."""
        decoder = Decoder(100)
        self.assertEqual(list(decoder.feed(b"\xc8")), [])  # 72 so far: may still be fine
        self.assertEqual(decoder.buffered, 1)
        self.assertTooLarge(decoder, b"\x01")  # n = 200

    def test_incomplete_prefix_already_too_large(self) -> None:
        """An incomplete prefix whose value already exceeds max_frame raises 413 at
        once: more prefix bytes can only make n larger."""
        self.assertTooLarge(Decoder(), b"\xff\xff\xff")  # >= 2**21 - 1
        self.assertTooLarge(Decoder(), b"\x80\x80\x85")  # >= 5 * 2**14 = 81920
        self.assertTooLarge(Decoder(100), b"\xe5")  # >= 101
        decoder = Decoder()
        self.assertEqual(list(decoder.feed(b"\x80\x80\x84")), [])  # >= 65536: not yet over
        self.assertEqual(decoder.buffered, 3)
        self.assertTooLarge(decoder, b"\x01")

    def test_frame_after_good_frames_too_large(self) -> None:
        """Packets before an oversized prefix in the same feed are yielded first."""
        decoder = Decoder(100)
        got: list[Any] = []
        try:
            for packet in decoder.feed(encode(P.Ping()) + b"\x65"):
                got.append(packet)
        except FrameTooLarge:
            pass
        else:
            self.fail("no FrameTooLarge")
        self.assertEqual(typed(got), typed([P.Ping()]))

    def test_six_byte_prefix(self) -> None:
        """A length prefix of more than 5 bytes is malformed (400), whole or in pieces."""
        data = b"\x80\x80\x80\x80\x80\x01\x05"
        self.assertMalformed(data)
        decoder = Decoder()
        self.assertEqual(list(decoder.feed(data[:4])), [])
        self.assertRaises(MalformedFrame, list, decoder.feed(data[4:]))

    def test_empty_frame(self) -> None:
        """n == 0 (no type byte) is malformed, however the zero is encoded."""
        self.assertMalformed(b"\x00")
        self.assertMalformed(b"\x80\x00")
        self.assertMalformed(encode(P.Ping()) + b"\x00\x01\x05")

    def test_body_not_msgpack(self) -> None:
        """A body that is not exactly one MessagePack value is malformed."""
        self.assertMalformed(raw_frame(P.ACK_R, b"\xc1"))  # never-used byte
        self.assertMalformed(raw_frame(P.ACK_R, b"\x92\x01"))  # truncated array
        self.assertMalformed(raw_frame(P.ACK_R, b"\x91\x01\x01"))  # trailing bytes
        self.assertMalformed(raw_frame(P.MSG_A, b"\xdd\xff\xff\xff\xff"))  # absurd length
        self.assertMalformed(raw_frame(P.PING, b"\xc1"))

    def test_body_not_an_array(self) -> None:
        """A body that is a map, a scalar or nil instead of an array is malformed."""
        self.assertMalformed(raw_frame(P.ACK_R, msgpack.packb({"seq": 1})))
        self.assertMalformed(raw_frame(P.ACK_R, b"\x81\xa1a\x01"))
        self.assertMalformed(raw_frame(P.ACK_R, b"\x05"))
        self.assertMalformed(raw_frame(P.PING, b"\xc0"))
        self.assertMalformed(raw_frame(P.PING, b"\x80"))  # empty map

    def test_too_few_fields(self) -> None:
        """Fewer fields than the required ones is malformed, an empty body included."""
        self.assertMalformed(frame(P.MSG_A, [1, 2]))
        self.assertMalformed(frame(P.LOGIN, ["u", "p"]))  # no device id
        self.assertMalformed(frame(P.WELCOME, [7, SID, KEY, "t", 0, 240, 300, 3]))  # v1's
        self.assertMalformed(frame(P.RESUMED, [7, 0, 3]))  # version 1's RESUMED
        self.assertMalformed(b"\x01\x15")  # ACK_N, n == 1
        self.assertMalformed(frame(P.MSG_N, [1, 2, 3, "b"]))
        self.assertMalformed(b"\x01\x13")  # ACK_R, n == 1
        self.assertMalformed(b"\x02\x13\x90")  # ACK_R, empty array

    def test_wrong_field_types(self) -> None:
        """A field of the wrong MessagePack type or out of range is malformed."""
        r = [SID, TS, NONCE, MAC]
        cases: dict[str, bytes] = {
            "str for int": frame(P.ACK_R, ["1"]),
            "bool for int": frame(P.ACK_R, [True]),
            "bool false for int": frame(P.KICKED, [False]),
            "negative int": frame(P.ACK_R, [-1]),
            "int 2**63 (uint64)": frame(P.ACK_R, [2**63]),
            "int 2**64 - 1 (uint64)": frame(P.ACK_R, [2**64 - 1]),
            "float for int": frame(P.ACK_R, [1.0]),
            "nil for int": frame(P.ACK_R, [None]),
            "bin for int": frame(P.ACK_R, [b"\x01"]),
            "bin for str": frame(P.LOGIN, [b"u", "p", DEV]),
            "str device id (version 1)": frame(P.LOGIN, ["u", "p", "phone"]),
            "str of 16 chars for device id": frame(P.LOGIN, ["u", "p", "d" * 16]),
            "bin15 device id": frame(P.LOGIN, ["u", "p", b"d" * 15]),
            "bin17 device id": frame(P.LOGIN, ["u", "p", b"d" * 17]),
            "int device name": frame(P.LOGIN, ["u", "p", DEV, 1]),
            "int for str": frame(P.CHANGED, [1, 2]),
            "int for bool": frame(P.PRESENCE, [1, 1]),
            "nil for bool": frame(P.PRESENCE, [1, None]),
            "int for str|bin": frame(P.MSG_R, [1, 2, 3]),
            "array for str|bin": frame(P.MSG_N, [1, 2, 3, ["x"], TS]),
            "bin15 for bin16": frame(P.RESUME, [b"s" * 15, *r[1:]]),
            "bin17 for bin16": frame(P.RESUME, [b"s" * 17, *r[1:]]),
            "bin7 for bin8": frame(P.RESUME, [*r[:2], b"n" * 7, r[3]]),
            "bin9 for bin8": frame(P.RESUME, [*r[:2], b"n" * 9, r[3]]),
            "bin15 mac": frame(P.RESUME, [*r[:3], b"m" * 15]),
            "bin31 for bin32": frame(P.WELCOME, [7, SID, b"k" * 31, "t", 0, 240, 300, 3, 0, 0]),
            "bin33 for bin32": frame(P.WELCOME, [7, SID, b"k" * 33, "t", 0, 240, 300, 3, 0, 0]),
            "str last_cmid": frame(P.WELCOME, [7, SID, KEY, "t", 0, 240, 300, 3, "0", 0]),
            "negative acked": frame(P.WELCOME, [7, SID, KEY, "t", 0, 240, 300, 3, 0, -1]),
            "nil acked in RESUMED": frame(P.RESUMED, [7, 0, 3, None]),
            "str for bin16": frame(P.RESUME, ["s" * 16, *r[1:]]),
            "str for bin32": frame(P.WELCOME, [7, SID, "k" * 32, "t", 0, 240, 300, 3, 0, 0]),
            "float seq": frame(P.MSG_A, [1, 2, 3.0]),
            "str for ACK_N seq": frame(P.ACK_N, ["1"]),
            "str optional int": frame(P.MSG_R, [1, 2, "x", "1"]),
            "negative optional int": frame(P.ERROR, [400, "m", -1]),
            "bin optional str": frame(P.LOGIN, ["u", "p", DEV, b"c"]),
            "bin optional client": frame(P.LOGIN, ["u", "p", DEV, "n", b"c"]),
            "negative optional group": frame(P.MSG_N, [1, 2, 3, "b", TS, -4]),
            "negative optional to": frame(P.MSG_N, [1, 2, 3, "b", TS, None, -4]),
            "str optional to": frame(P.MSG_N, [1, 2, 3, "b", TS, None, "9"]),
        }
        for name, data in cases.items():
            error = error_of(data)
            self.assertIsInstance(error, MalformedFrame, name)

    def test_malformed_online(self) -> None:
        """ONLINE whose body is not an array of uints is malformed: a map, a
        scalar, nil, an element of another type or out of range, bad MessagePack."""
        for body in (
            msgpack.packb({"uids": [1]}),
            b"\x05",
            b"\xc0",
            msgpack.packb(["1"]),
            msgpack.packb([1, -1]),
            msgpack.packb([True]),
            msgpack.packb([1, None]),
            msgpack.packb([1.0]),
            msgpack.packb([[1]]),
            msgpack.packb([b"\x01"]),
            msgpack.packb([2**63]),
            b"\xc1",
            b"\x92\x01",  # truncated
            b"\x91\x01\x01",  # trailing bytes
        ):
            self.assertMalformed(raw_frame(P.ONLINE, body))

    def test_nil_optional_field(self) -> None:
        """An optional field sent as nil is read as unset, like one left out;
        nil in a required field is malformed."""
        [packet] = list(Decoder().feed(frame(P.MSG_R, [1, 2, "x", None])))
        self.assertEqual(packet, P.MsgR(1, 2, "x"))
        [packet] = list(Decoder().feed(frame(P.ERROR, [400, "m", None])))
        self.assertEqual(packet, P.Error(400, "m"))
        [packet] = list(Decoder().feed(frame(P.LOGIN, ["u", "p", DEV, None, "c"])))
        self.assertEqual(typed([packet]), typed([P.Login("u", "p", DEV, None, "c")]))
        [packet] = list(Decoder().feed(frame(P.MSG_N, [1, 2, 3, "b", TS, None, 9])))
        self.assertEqual(typed([packet]), typed([P.MsgN(1, 2, 3, "b", TS, None, 9)]))
        self.assertMalformed(frame(P.MSG_R, [1, None, "x"]))
        self.assertMalformed(frame(P.LOGIN, ["u", "p", None]))

    def test_invalid_utf8(self) -> None:
        """A MessagePack str that is not valid UTF-8 is malformed, in every str field."""
        bad = b"\xa2\xff\xfe"
        surrogate = b"\xa3\xed\xa0\x80"  # UTF-8 of a lone surrogate, invalid
        for s in (bad, surrogate):
            device = b"\xc4\x10" + DEV
            self.assertMalformed(raw_frame(P.LOGIN, b"\x93" + s + b"\xa1p" + device))
            self.assertMalformed(raw_frame(P.LOGIN, b"\x94\xa1u\xa1p" + device + s))
            self.assertMalformed(raw_frame(P.MSG_R, b"\x93\x01\x02" + s))
            self.assertMalformed(raw_frame(P.CHANGED, b"\x92" + s + b"\x01"))
            self.assertMalformed(raw_frame(P.ERROR, b"\x92\xcd\x01\x90" + s))

    def test_bytes_held_even_if_not_iterated(self) -> None:
        """Bytes given to feed are held whether or not its iterator is consumed."""
        decoder = Decoder()
        decoder.feed(b"\x01")
        self.assertEqual(decoder.buffered, 1)
        self.assertEqual(list(decoder.feed(b"\x05")), [P.Ping()])

    def test_error_is_sticky(self) -> None:
        """After an error the decoder raises it again on every feed, even of valid
        bytes (at the call, before any iteration), and holds nothing."""
        decoder = Decoder()
        self.assertRaises(MalformedFrame, lambda: list(decoder.feed(b"\x00")))
        self.assertEqual(decoder.buffered, 0)
        self.assertRaises(MalformedFrame, lambda: list(decoder.feed(encode(P.Ping()))))
        self.assertRaises(MalformedFrame, lambda: list(decoder.feed(b"")))
        big = Decoder(100)
        self.assertRaises(FrameTooLarge, lambda: list(big.feed(b"\x65")))
        self.assertRaises(FrameTooLarge, lambda: list(big.feed(encode(P.Ping()))))

    def test_error_after_packets_in_same_feed(self) -> None:
        """Packets before a malformed frame in the same feed are yielded, then the
        error is raised; the bytes after it are never decoded."""
        decoder = Decoder()
        got: list[Any] = []
        data = encode(P.AckR(1)) + frame(P.ACK_R, ["x"]) + encode(P.AckR(2))
        try:
            for packet in decoder.feed(data):
                got.append(packet)
        except MalformedFrame:
            pass
        else:
            self.fail("no MalformedFrame")
        self.assertEqual(typed(got), typed([P.AckR(1)]))


# --- the budgets, on what the server sends ------------------------------------------


class ByteBudgetTests(SynchronousTestCase):
    """PROTOCOL.md section 0: the six packets of "你好" take 48 bytes on a fresh
    database; RESUME and RESUMED together at most 72.  Measured on the frames
    the server writes (through the Harness), not on hand-built packets."""

    def setUp(self) -> None:
        self.h = Harness()
        self.alice = add_user(self.h.store, "alice")
        self.bob = add_user(self.h.store, "bob")
        self.a = self.h.connect()
        self.welcome = self.a.login("alice")
        self.b = self.h.connect()
        self.b.login("bob")

    def written(self, client: Any) -> bytes:
        data = client.transport.value()
        client.transport.clear()
        return bytes(data)

    def test_six_packets_of_nihao_take_48_bytes(self) -> None:
        """MSG_R 12 + MSG_A 6 + MSG_N 18 + ACK_R 4 + ACK_A 4 + ACK_N 4 = 48 bytes,
        each a single frame of its type, on a fresh database (small ids and seqs)."""
        msg_r = encode(P.MsgR(1, self.bob, "你好"))
        self.a.send_bytes(msg_r)
        msg_a = self.written(self.a)
        msg_n = self.written(self.b)
        ack_r = encode(P.AckR(1))
        self.b.send_bytes(ack_r)
        ack_a = self.written(self.b)
        ack_n = self.written(self.a)
        frames = [msg_r, msg_a, msg_n, ack_r, ack_a, ack_n]
        self.assertEqual(
            typed([p for f in frames for p in decode_all(f)]),
            typed([
                P.MsgR(1, self.bob, "你好"),
                P.MsgA(1, 1, 1),
                P.MsgN(1, 1, self.alice, "你好", int(self.h.reactor.seconds())),
                P.AckR(1),
                P.AckA(1),
                P.AckN(1),
            ]),
        )
        self.assertEqual([len(f) for f in frames], [12, 6, 18, 4, 4, 4])
        self.assertEqual(sum(len(f) for f in frames), 48)

    def test_resume_and_resumed_take_at_most_72_bytes(self) -> None:
        """A drop and a RESUME within the linger: the RESUME frame and all the
        server answers (RESUMED alone: no ONLINE for a device that lingered)
        take at most 72 bytes."""
        self.a.drop()
        client = self.h.connect()
        resume = encode(resume_for(self.welcome, int(self.h.reactor.seconds())))
        client.send_bytes(resume)
        answer = self.written(client)
        self.assertEqual(
            typed(decode_all(answer)), typed([P.Resumed(self.alice, 0, 7, 0)])
        )
        self.assertEqual((len(resume), len(answer)), (54, 7))
        self.assertLessEqual(len(resume) + len(answer), 72)

    def test_online_with_nobody_is_the_empty_array(self) -> None:
        """What the server writes after WELCOME when no friend is online is ONLINE
        with the empty array as its body: the three bytes 02 22 90."""
        carol = self.h.connect()
        add_user(self.h.store, "carol")
        carol.send(P.Login("carol", "pw", DEV))
        data = self.written(carol)
        welcome = decode_all(data)[0]
        self.assertIsInstance(welcome, P.Welcome)
        self.assertEqual(data, encode(welcome) + b"\x02\x22\x90")
