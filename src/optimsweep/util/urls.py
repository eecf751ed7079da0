"""Store URLs as they may be shown and stored: with any password replaced by ***."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# user:password@ in any URL-looking text, for messages that quote a URL we did not build
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


def redact(url: str | None) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db; anything without a
    password unchanged."""
    if not url or "://" not in url:
        return url or ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str) -> str:
    """Every `scheme://user:password@` inside free text (an error message) with *** instead."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
