"""Check a stack file offline, before `pulumi` runs (`make preview`, `make up`).

    python tools/check_stack_file.py Pulumi.<stack>.yaml

A YAML error, a key this program does not know (with the closest one it
knows), a bad value or a credential stored in plain text: the problems, one
a line, and exit 1. No file yet
(a stack `pulumi stack select --create` is about to create): nothing to
check, exit 0. Secret values are not decrypted; they are checked by the
program itself when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import ConfigError, check_config
from devtools.mockstack import SECRET, StackFileError, stack_file_config
from preflight import plaintext_credentials


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(args[0])
    if not path.is_file():
        return 0
    try:
        config = stack_file_config(path)
        check_config(config)
    except (StackFileError, ConfigError) as err:
        print(f"{path}: {err}" if isinstance(err, ConfigError) else str(err), file=sys.stderr)
        return 1
    plain = plaintext_credentials(lambda key: key in config, lambda key: config[key] == SECRET)
    for problem in plain:
        print(f"{path}: {problem}", file=sys.stderr)
    return 1 if plain else 0


if __name__ == "__main__":
    sys.exit(main())
