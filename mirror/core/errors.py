"""Registry errors: the OCI error codes and the JSON body every error answer carries.

The core raises :class:`RegistryError`; the web layer renders it with :func:`error_body`.
Codes and statuses follow the OCI Distribution Specification ("Error Codes") and, for
codes the OCI spec leaves out (``UNAVAILABLE``), the Docker Registry HTTP API v2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["STATUS", "RegistryError", "error_body"]

#: Default HTTP status per error code.
STATUS: Mapping[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "UNAVAILABLE": 503,
    "UNKNOWN": 500,
}


class RegistryError(Exception):
    """An error the registry answers with the spec's JSON body.

    Args:
        code: an OCI error code, e.g. ``"MANIFEST_UNKNOWN"``.
        message: a sentence for the user.
        status: the HTTP status; defaults to the code's usual one.
        detail: optional JSON-able detail.
        headers: extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        detail: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS.get(code, 500)
        self.detail = detail
        self.headers = dict(headers or {})


def error_body(error: RegistryError) -> bytes:
    """The spec's ``{"errors": [...]}`` body for one error."""
    entry: dict[str, object] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    return json.dumps({"errors": [entry]}).encode()
