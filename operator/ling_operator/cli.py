"""`ling-operator`: command-line entry point (placeholder until the operator lands)."""

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ling-operator", description="LingDeployment operator")
    parser.parse_args(argv)
    return 0
