"""``python -m kdbench`` (and ``torchrun ... -m kdbench run``) is the ``kdbench`` command."""

from kdbench.cli import main

main()
