"""AWS event-stream framing (application/vnd.amazon.eventstream), written out by hand so the
stand-in does not share code with the relay: a 12-byte prelude (total length, headers length,
CRC32 of those 8 bytes), headers, payload, and a CRC32 of everything before it."""

import struct
import zlib

STRING_TYPE = 7


def encode_headers(headers):
    out = bytearray()
    for name, value in headers.items():
        raw_name = name.encode()
        raw_value = value.encode()
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", STRING_TYPE, len(raw_value)) + raw_value
    return bytes(out)


def encode_frame(headers, payload):
    raw_headers = encode_headers(headers)
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + raw_headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def event(event_type, payload):
    return encode_frame(
        {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
        payload,
    )


def exception(exception_type, payload):
    return encode_frame(
        {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"},
        payload,
    )


class FrameDecoder:
    """Feed bytes as they arrive; get back complete (headers, payload) frames, checking CRCs."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data):
        self.buffer += data
        frames = []
        while len(self.buffer) >= 12:
            total, headers_len, prelude_crc = struct.unpack(">III", self.buffer[:12])
            if zlib.crc32(bytes(self.buffer[:8])) != prelude_crc:
                raise ValueError("event-stream prelude CRC mismatch")
            if len(self.buffer) < total:
                break
            frame = bytes(self.buffer[:total])
            del self.buffer[:total]
            (message_crc,) = struct.unpack(">I", frame[-4:])
            if zlib.crc32(frame[:-4]) != message_crc:
                raise ValueError("event-stream message CRC mismatch")
            frames.append((decode_headers(frame[12 : 12 + headers_len]), frame[12 + headers_len : -4]))
        return frames


def decode_headers(raw):
    headers = {}
    i = 0
    while i < len(raw):
        name_len = raw[i]
        name = raw[i + 1 : i + 1 + name_len].decode()
        i += 1 + name_len
        kind = raw[i]
        i += 1
        if kind != STRING_TYPE:
            raise ValueError(f"unsupported header type {kind}")
        (value_len,) = struct.unpack(">H", raw[i : i + 2])
        headers[name] = raw[i + 2 : i + 2 + value_len].decode()
        i += 2 + value_len
    return headers
