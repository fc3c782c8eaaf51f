"""``python -m cli``: the ``flow`` command."""

from cli.main import main

main()
