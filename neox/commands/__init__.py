"""The `neox` command modules: each provides `register(parser, name)` for its command (see neox/cli.py)."""
