"""Plain helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import struct


def image_bytes(fmt="JPEG", size=(64, 48), mode="RGB", color=(200, 30, 30), **save):
    """A generated image encoded as ``fmt``."""
    from PIL import Image

    im = Image.new(mode, size, color)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def noisy_jpeg(size=(3000, 2000)):
    """A photo-like JPEG (noise) that keeps a worker busy for about a quarter second."""
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def multipart(fields=None, files=()):
    """Encode a multipart/form-data body: files are (field, filename, bytes[, content type])."""
    import uuid

    boundary = "----imgworker" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for item in files:
        field, filename, data = item[:3]
        ctype = item[3] if len(item) > 3 else "application/octet-stream"
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Http:
    """A tiny HTTP client for tests: raw paths are sent exactly as given."""

    def __init__(self, base):
        from urllib.parse import urlsplit

        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.base = base

    def request(self, method, path, body=None, headers=None):
        import http.client
        import json as _json

        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            headers = dict(headers or {})
            if body is not None:
                headers.setdefault("Content-Length", str(len(body)))
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        resp.body = data
        try:
            resp.json = _json.loads(data) if data else None
        except ValueError:
            resp.json = None
        return resp

    def get(self, path, **headers):
        return self.request("GET", path, headers=headers)

    def upload(self, path="/api/process/single", files=(), fields=None, headers=None):
        body, ctype = multipart(fields, files)
        return self.request("POST", path, body, {"Content-Type": ctype, **(headers or {})})


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SRGB_COLORANTS = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))  # D50


def swapped_icc():
    """An RGB matrix/TRC ICC profile whose red and green colorants are sRGB's
    green and red: a pixel stored as pure red displays as green."""
    red, green, blue = SRGB_COLORANTS
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0"  # gamma 2.2
    return matrix_icc((green, red, blue), (curve, curve, curve))


def srgb_curve(level):
    """sRGB's decoding curve at ``level`` (0-255), 0.0-1.0."""
    v = level / 255
    return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4


def table_curve(values):
    """An ICC curv tag from a table of 0.0-1.0 values."""
    return b"curv\0\0\0\0" + struct.pack(">I", len(values)) + b"".join(
        struct.pack(">H", round(min(1.0, max(0.0, v)) * 65535)) for v in values)


def matrix_icc(colorants, curves):
    """An RGB matrix/TRC (v2 display) ICC profile with these D50 colorants
    (red, green, blue XYZ) and curv tags (red, green, blue)."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    desc = b"desc\0\0\0\0" + struct.pack(">I", 5) + b"test\0" + bytes(78)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*colorants[0])),
            (b"gXYZ", xyz(*colorants[1])), (b"bXYZ", xyz(*colorants[2])),
            (b"rTRC", curves[0]), (b"gTRC", curves[1]), (b"bTRC", curves[2])]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    header = (struct.pack(">I", offset + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data
