"""Chat templates moemesh ships, as files: `shipped(name)` reads one, `load_template` reads a name or a path.

- `deepseek_v3_tools`: DeepSeek-V3's conversation format plus the request's `tools` in the system prompt
  (DeepSeek's own V3 template ignores them), for the deepseek_v3 tool-call parser.
"""

from __future__ import annotations

import re
from pathlib import Path

_HERE = Path(__file__).resolve().parent
SHIPPED = {"deepseek_v3_tools": "deepseek_v3_tools.jinja"}
# The shipped template that renders `tools` in each tool-call parser's format.
TOOLS_TEMPLATE_FOR_PARSER = {"deepseek_v3": "deepseek_v3_tools"}
_USES_TOOLS = re.compile(r"\btools\b")


class TemplateNotFound(ValueError):
    """Neither a shipped template's name nor a readable file."""


def shipped(name: str) -> str:
    """The text of shipped template `name` (KeyError for an unknown one)."""
    return (_HERE / SHIPPED[name]).read_text(encoding="utf-8")


def load_template(name_or_path: str) -> str:
    """A shipped template by name, or a template file's text (`--chat-template`)."""
    if name_or_path in SHIPPED:
        return shipped(name_or_path)
    path = Path(name_or_path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateNotFound(f"chat template {name_or_path!r} is neither a file that can be read ({exc}) nor "
                               f"one of moemesh's ({', '.join(SHIPPED)})") from None


def renders_tools(template: str | None) -> bool:
    """Whether a template reads the `tools` variable at all (DeepSeek-V3's official one does not)."""
    return bool(template) and _USES_TOOLS.search(template) is not None
