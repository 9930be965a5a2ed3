"""The `engines` parameter of a model's config.pbtxt: what `python -m training.export` measured on THIS machine
(1/engines.json's summary as one line of JSON, read by the gateway's ListModels through Triton's model config).

It must not make a checkout dirty: after `make run` / `make test` export writes it, `git status` should stay clean
and `git pull` should still update the file. So
- the committed file holds a placeholder block (PLACEHOLDER: "not measured on this machine"), and export writes the
  measured block at the same size in bytes (the JSON padded with spaces to WIDTH characters);
- a git clean filter (`make setup` configures it; .gitattributes applies it to model_repository/*/config.pbtxt) turns
  any measured block back into the placeholder on its way into git.
Same size + same cleaned content: git sees the file unchanged (it compares sizes before it runs the filter, so the
padding matters); an edit anywhere else in the file still shows.

    python3 mnistgen/engines_param.py < config.pbtxt     # the file with the placeholder block, on stdout

Standard library only: git runs it with the system python3, outside the virtualenv.
"""
from __future__ import annotations

import json
import re
import sys

ENGINES_PARAM = "engines"  # config.pbtxt parameter: export's summary of 1/engines.json for clients
GIT_FILTER = "engines-param"  # the filter's name in .gitattributes and git config
WIDTH = 1024  # characters of the padded JSON value (a summary is ~450)
# the block training.export writes: its comment lines and the parameter
BLOCK = re.compile(r'# [^\n]*engines\.json[^\n]*\n(?:# [^\n]*\n)*parameters \{\s*key: "engines"\s*'
                   r"value \{ string_value: '[^']*' \}\s*\}\n?")
NOT_MEASURED = {"engines": [], "threshold": None, "source": "not measured on this machine: run python -m training.export",
                "description": ""}


def block(summary: dict) -> str:
    """The config.pbtxt block for this summary, the JSON padded to WIDTH (longer summaries are written whole)."""
    value = json.dumps(summary).replace("'", "").replace("\\", "")  # a single-quoted text-format string
    return ("# written by `python -m training.export` from 1/engines.json (its summary, padded to a fixed size; edit\n"
            "# runtime / engine_threshold / precision above to override, not this)\n"
            f"parameters {{\n  key: \"{ENGINES_PARAM}\"\n  value {{ string_value: '{value.ljust(WIDTH)}' }}\n}}\n")


PLACEHOLDER = block(NOT_MEASURED)


def clean(text: str) -> str:
    """config.pbtxt text with its measured `engines` block replaced by PLACEHOLDER (unchanged when it has none)."""
    return BLOCK.sub(lambda _: PLACEHOLDER, text)


if __name__ == "__main__":
    sys.stdout.write(clean(sys.stdin.read()))
