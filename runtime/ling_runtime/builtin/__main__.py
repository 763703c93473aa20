"""`python -m ling_runtime.builtin [build|path|info]`: the built-in model's cache from the shell.

- ``build`` (default): train it now if this machine has not (progress on stderr), print its directory.
- ``path``: print the directory it has (or will have), build nothing; exit 1 if not built yet.
- ``info``: print its ``builtin.json`` (size, training time, held-out accuracy).
"""

from __future__ import annotations

import argparse
import sys

from ling_runtime.builtin.build import MARKER, builtin_key, builtin_model_dir, cache_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ling_runtime.builtin", description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="build", choices=["build", "path", "info"])
    args = p.parse_args(argv)
    if args.command == "path":
        target = cache_root() / f"builtin-{builtin_key()}"
        print(target)
        return 0 if (target / MARKER).exists() else 1
    target = builtin_model_dir()
    if args.command == "info":
        print((target / MARKER).read_text(), end="")
    else:
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
