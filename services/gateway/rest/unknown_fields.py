"""Request fields the REST facade does not know: accepted (clients send many) and logged once per name, as vLLM
logs them, so a field that silently changes nothing can still be found in the gateway's log."""

from __future__ import annotations

import logging

from pydantic import BaseModel

log = logging.getLogger(__name__)


class UnknownFields:
    """The names already logged, per endpoint (one warning per new name, not one per request)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def note(self, endpoint: str, body: BaseModel) -> list[str]:
        """Log the top-level fields of `body` its model does not declare and that were not logged before;
        returns them (for tests)."""
        new = sorted(name for name in (body.model_extra or {}) if (endpoint, name) not in self._seen)
        if new:
            self._seen.update((endpoint, name) for name in new)
            log.warning("%s: ignoring request fields this gateway does not know: %s (logged once per field)",
                        endpoint, ", ".join(new))
        return new
