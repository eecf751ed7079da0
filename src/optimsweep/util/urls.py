"""Store URLs and DSNs as they may be shown and stored: every secret replaced by ***.

A secret can ride in a URL's userinfo (`postgresql://user:secret@host/db`), in its query
(`?password=secret`, `?sslpassword=`, `?token=`), in a libpq keyword DSN
(`host=db password='a secret'`), and as the whole userinfo of an http(s) URL, which
servers read as a token (`https://TOKEN@mlflow.example`).
"""

from __future__ import annotations

import re

_SCHEME = r"[a-zA-Z][a-zA-Z0-9+.-]*://"
# user:password@ in any URL
_USERINFO = re.compile(rf"(?P<scheme>{_SCHEME})(?P<user>[^:/@\s'\"]*):[^@/\s'\"]*@")
# a lone userinfo of an http(s) URL: a token
_HTTP_TOKEN = re.compile(r"(?P<scheme>https?://)[^:/@\s'\"]+@")
# key=value in a query string or a keyword DSN, for the keys that hold secrets
SECRET_KEYS = ("password", "passwd", "pwd", "sslpassword", "token", "access_token",
               "refresh_token", "api_key", "apikey", "secret", "client_secret")
_KEYWORD = re.compile(
    rf"(?i)(?P<key>(?<![\w.-])(?:{'|'.join(SECRET_KEYS)}))(?P<eq>\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;,'\"]+)")


def redact_text(text: str) -> str:
    """Every secret in free text (an error message, a traceback, a sweep file) as ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _HTTP_TOKEN.sub(lambda m: f"{m['scheme']}***@", text)
    return _KEYWORD.sub(lambda m: f"{m['key']}{m['eq']}***", text)


def redact(url: str | None) -> str:
    """A store URL or DSN as it may be shown: postgresql://user:secret@host/db ->
    postgresql://user:***@host/db; anything without a secret unchanged."""
    return redact_text(url or "")
