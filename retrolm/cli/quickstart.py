"""Placeholder until the `quickstart` subcommand lands; replaced by its owner."""


def register(subparsers) -> None:  # noqa: ARG001
    return None
