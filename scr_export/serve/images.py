"""The ``image_url`` of a chat message -> an RGB PIL image, within the server's limits.

Data URIs always; local paths (``file://`` or absolute) only with ``--allow-local-files``; ``http(s)://`` only with
``--allow-remote-urls`` (fetched with httpx, size-capped, short timeout). Anything else, an undecodable image, or
one beyond ``--max-image-bytes`` / ``--max-image-pixels`` is a 400 naming the message part.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from pathlib import Path
from typing import Any

from .protocol import RequestError


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    allow_local_files: bool = False
    allow_remote_urls: bool = False
    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    fetch_timeout_s: float = 10.0

    def load(self, url: str, param: str) -> Any:
        if url.startswith("data:"):
            data = _data_uri(url, param, self.max_bytes)
        elif url.startswith(("http://", "https://")):
            if not self.allow_remote_urls:
                raise RequestError(f"{param}: remote image URLs are not fetched by this server", param=param,
                                   code="remote_url_refused")
            data = self._fetch(url, param)
        else:
            path = Path(url[len("file://"):] if url.startswith("file://") else url)
            if not self.allow_local_files or not path.is_absolute():
                raise RequestError(f"{param}: pass the image as a data URI (data:image/png;base64,...); local paths "
                                   "need the server's --allow-local-files and an absolute path", param=param,
                                   code="local_file_refused")
            if not path.is_file():
                raise RequestError(f"{param}: {path} does not exist", param=param, code="invalid_image")
            if path.stat().st_size > self.max_bytes:
                raise RequestError(f"{param}: the image is {path.stat().st_size} bytes, over this server's limit of "
                                   f"{self.max_bytes}", param=param, code="image_too_large")
            data = path.read_bytes()
        return self._decode(data, param)

    def _fetch(self, url: str, param: str) -> bytes:
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.fetch_timeout_s, follow_redirects=True) as r:
                r.raise_for_status()
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise RequestError(f"{param}: the image at {url} is over this server's limit of "
                                           f"{self.max_bytes} bytes", param=param, code="image_too_large")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise RequestError(f"{param}: cannot fetch {url} ({exc})", param=param, code="invalid_image") from None
        return b"".join(chunks)

    def _decode(self, data: bytes, param: str) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > self.max_pixels:
                    raise RequestError(f"{param}: the image is {im.width}x{im.height}, over this server's limit of "
                                       f"{self.max_pixels} pixels", param=param, code="image_too_large")
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise RequestError(f"{param}: the data is not an image PIL can read ({exc.__class__.__name__})",
                               param=param, code="invalid_image") from None


def _data_uri(url: str, param: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise RequestError(f"{param}: expected data:image/...;base64,<data>", param=param, code="invalid_image")
    if len(payload) * 3 // 4 > max_bytes:
        raise RequestError(f"{param}: the image is about {len(payload) * 3 // 4} bytes, over this server's limit of "
                           f"{max_bytes}", param=param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param}: the data URI is not valid base64", param=param, code="invalid_image") from None
