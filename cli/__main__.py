"""``python -m cli``: the ``bone-server`` command without the console script."""

from cli.main import main

main()
