"""Bounds on what a caller may hand kvtransfer, checked at the edge (servicer, relay) before anything is kept.

Ids and addresses are echoed in errors, logs and every later call's status; unbounded ones would make
those errors unreadable (a gRPC status message past 8 KiB is dropped by the client, who then sees
RESOURCE_EXHAUSTED or INTERNAL instead of the reason) and let one caller grow the service's memory.
"""

from __future__ import annotations

from moemesh.services.kvtransfer.errors import KvTransferError, Reason

# Room ids, request ids, addresses and model fingerprints: far above what the workers send (uuids,
# host:port, hex digests), far below what would make a status message unreadable.
MAX_ID_CHARS = 256
# A reported failure reason is kept (and shown to every watcher) cut to this.
MAX_ERROR_CHARS = 1024


def check_id(name: str, value: str, *, required: bool = True) -> str:
    """`value` when it is a usable id; INVALID naming the field when empty (and required) or too long."""
    if not value and required:
        raise KvTransferError(Reason.INVALID, f"{name} is required")
    if len(value) > MAX_ID_CHARS:
        raise KvTransferError(Reason.INVALID, f"{name} is {len(value)} characters long; at most {MAX_ID_CHARS} "
                                              f"are allowed (it starts {value[:32]!r})")
    return value


def clip(text: str, max_chars: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to `max_chars`, saying so."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... ({len(text) - max_chars} more characters)"
