"""``python -m togembed``: the same as the ``togembed`` command."""

from .cli import main

main()
