"""What every ``scripts/`` entry point shares: flag errors as one line and exit status 1.

absl reports a config file that raised while loading (``--config=configs/X.py:bad=1``) with the
whole traceback of ml_collections' loader; a user needs its last line, which is the message the
config file raised. ``app.run(main, flags_parser=cli.parse_flags)`` gives that.
"""

from __future__ import annotations

import re
import sys

from absl import flags


def error_line(error: BaseException) -> str:
    """The message an error carries, without a traceback or the exception's module path."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and "Traceback" in str(error):
        # The last line of a quoted traceback: 'package.module.SomeError: message'.
        last = lines[-1].strip()
        return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return lines[0]


def parse_flags(argv: list[str]) -> list[str]:
    """``absl.flags.FLAGS(argv)``, exiting with one line and status 1 on a bad flag or config."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {error_line(e)}\n(--helpfull lists the flags)")
    except (AttributeError, KeyError) as e:
        # ml_collections raises these (not a flags.Error) for an override of a field the config
        # does not have, e.g. --config.steps=3.
        text = str(e.args[0] if e.args else e)
        while text[:1] in "'\"" and text[-1:] == text[:1] and len(text) > 1:  # KeyError's repr, nested
            text = text[1:-1].encode().decode("unicode_escape")
        name, _, hint = text.partition("\n")
        name = name.strip("'\" ")
        given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and name in a.split("=", 1)[0]]
        where = given[0] if given else "--config"
        hint = f" ({hint.strip()})" if hint.strip() else ""
        sys.exit(f"error: {where}: the config has no field {name!r}{hint}")
