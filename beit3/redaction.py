"""Keeping credentials written into URLs (`https://user:token@host`) out of everything the system writes.

Configs saved beside a run, MLflow params and error messages go through `redact_urls`; the MLflow client is
handed the URL without its credentials (see `split_url_credentials`), so its own messages cannot show them
either. AWS keys never enter a URL: boto3 reads them from the environment and nothing here logs it.
"""

import re
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]*)@")


def redact_urls(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` replaced by ***."""
    return _USERINFO.sub(lambda match: f"{match['scheme']}{match['user']}:{REDACTED}@", text)


def split_url_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without `user:password@`, the user, the password), decoded; (url, None, None) without them."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    return (urlunsplit(parts._replace(netloc=host)), unquote(parts.username or ""),
            unquote(parts.password) if parts.password is not None else None)
