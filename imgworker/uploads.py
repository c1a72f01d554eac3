"""Streaming multipart/form-data intake: file parts go straight to temp files
under DATA_DIR/tmp, with per-file, per-field and per-request limits.

Parsing is done by the ``multipart`` package's push parser (see README,
"Dependencies"); this module decides where bytes go and what is too much.
A file part over the size limit is drained without being stored and marked
``too_large`` so that a batch can refuse that one file and keep the others.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from multipart import MultipartError, PushMultipartParser, parse_options_header

from .errors import InvalidParameter, ServiceError
from .storage import temp_upload_prefix
from .model import ErrorCode

CHUNK = 64 * 1024
MAX_FIELD_BYTES = 1024      # option values are short numbers or names
MAX_PARTS_EXTRA = 16        # text fields allowed beside the files


@dataclass
class UploadedFile:
    field: str
    filename: str           # the client's name, for display only: never a path
    path: Path | None       # temp file under DATA_DIR/tmp (None when refused)
    size: int = 0
    too_large: bool = False

    def discard(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)

    def discard(self) -> None:
        for f in self.files:
            f.discard()


def display_name(raw: str | None) -> str:
    """The client's file name reduced to something safe to show and store:
    last path component, printable, at most 200 characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()
    return name[:200] or "upload"


def read_form(environ: dict, tmp_dir: Path, file_fields: tuple[str, ...], max_file_bytes: int,
              max_files: int) -> Form:
    """Parse the request body. Raises ServiceError (400) for a body that is
    not multipart or is malformed; on any error nothing is left on disk."""
    ctype, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
    if ctype != "multipart/form-data" or not options.get("boundary"):
        raise ServiceError("Send the image as multipart/form-data (field 'image' or 'images')", ErrorCode.NO_FILE)
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        length = -1
    stream: BinaryIO = environ["wsgi.input"]
    form = Form()
    current: UploadedFile | None = None
    sink: BinaryIO | None = None
    text: bytearray | None = None
    text_name = ""
    remaining = length
    try:
        parser = PushMultipartParser(options["boundary"], content_length=length,
                                     max_segment_count=max_files + MAX_PARTS_EXTRA)
        with parser:
            while not parser.closed:
                want = CHUNK if remaining < 0 else min(CHUNK, remaining)
                chunk = stream.read(want) if want else b""
                remaining -= len(chunk)
                for event in parser.parse(chunk):
                    if event is None:  # end of a part
                        if sink is not None:
                            sink.close()
                            sink = None
                        if text is not None:
                            form.fields.setdefault(text_name, text.decode("utf-8", "replace"))
                            text = None
                        current = None
                    elif isinstance(event, (bytes, bytearray)):
                        if current is not None:
                            current.size += len(event)
                            if current.size > max_file_bytes:
                                if not current.too_large:
                                    current.too_large = True
                                    sink.close()
                                    sink = None
                                    current.discard()
                            elif sink is not None:
                                sink.write(event)
                        elif text is not None:
                            if len(text) + len(event) > MAX_FIELD_BYTES:
                                raise InvalidParameter(f"The field '{text_name}' is too long")
                            text += event
                    else:  # a new part's headers
                        if event.filename is not None and event.name in file_fields:
                            if len(form.files) >= max_files:
                                raise InvalidParameter(f"Too many files: at most {max_files} per request")
                            # the pid in the name lets cleanup sweep files of dead processes at once
                            fd, tmp = tempfile.mkstemp(prefix=temp_upload_prefix(), dir=tmp_dir)
                            sink = os.fdopen(fd, "wb")
                            current = UploadedFile(event.name, display_name(event.filename), Path(tmp))
                            form.files.append(current)
                        elif event.filename is not None:
                            raise InvalidParameter(f"Unexpected file field '{event.name}'; use "
                                                   + " or ".join(f"'{f}'" for f in file_fields))
                        else:
                            text, text_name = bytearray(), event.name
                if not chunk:
                    break
        return form
    except MultipartError as exc:
        form.discard()
        raise InvalidParameter(f"Malformed multipart body: {exc}") from None
    except BaseException:
        form.discard()
        raise
    finally:
        if sink is not None:
            sink.close()
