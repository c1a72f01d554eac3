"""A minimal lossless JPEG writer (SOF3, predictor 1, 8-bit, no subsampling) for
fixtures: Pillow cannot write one, and libjpeg-turbo decodes such a file only
at full size (it refuses a DCT scale for it)."""
import struct

# standard DC luminance table extended to categories 0..11
BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
VALS = list(range(12))

def _codes():
    codes, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(BITS[length - 1]):
            codes[VALS[k]] = (code, length); code += 1; k += 1
        code <<= 1
    return codes

def lossless_jpeg(width: int, height: int, pixels, ncomp: int = 1) -> bytes:
    """The file for ``pixels(x, y)`` -> a tuple of ``ncomp`` ints in 0..255."""
    codes = _codes()
    out = bytearray(); acc = 0; nbits = 0
    def put(value, length):
        nonlocal acc, nbits
        acc = (acc << length) | (value & ((1 << length) - 1)); nbits += length
        while nbits >= 8:
            byte = (acc >> (nbits - 8)) & 0xFF; out.append(byte)
            if byte == 0xFF: out.append(0)
            nbits -= 8
    rows = [[pixels(x, y) for x in range(width)] for y in range(height)]
    for y in range(height):
        for x in range(width):
            for c in range(ncomp):
                if x == 0 and y == 0: pred = 128
                elif y == 0: pred = rows[y][x - 1][c]
                elif x == 0: pred = rows[y - 1][x][c]
                else: pred = rows[y][x - 1][c]
                d = rows[y][x][c] - pred
                cat = abs(d).bit_length()
                code, length = codes[cat]; put(code, length)
                if cat: put(d if d > 0 else d + (1 << cat) - 1, cat)
    if nbits: put((1 << (8 - nbits)) - 1, 8 - nbits)
    def seg(marker, body): return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body
    sof = struct.pack(">BHHB", 8, height, width, ncomp) + b"".join(bytes([i + 1, 0x11, 0]) for i in range(ncomp))
    dht = bytes([0x00]) + bytes(BITS) + bytes(VALS)
    sos = bytes([ncomp]) + b"".join(bytes([i + 1, 0x00]) for i in range(ncomp)) + bytes([1, 0, 0])
    return b"\xff\xd8" + seg(0xC3, sof) + seg(0xC4, dht) + seg(0xDA, sos) + bytes(out) + b"\xff\xd9"
