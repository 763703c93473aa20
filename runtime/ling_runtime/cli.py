"""`ling-runtime`: command-line entry point (placeholder until the runtime lands)."""

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ling-runtime", description="Ling-2.6 serving runtime")
    parser.parse_args(argv)
    return 0
