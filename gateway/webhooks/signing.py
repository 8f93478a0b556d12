"""Standard Webhooks signing (https://www.standardwebhooks.com): the three headers of a
delivery. The signature is HMAC-SHA256, keyed by the secret's base64-decoded bytes, over
`{webhook-id}.{webhook-timestamp}.{body}`, sent as `v1,<base64>`."""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one try: `timestamp` (unix seconds) is when it is sent, so a
    receiver's replay window holds for retries too; the id stays the same."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
    }
