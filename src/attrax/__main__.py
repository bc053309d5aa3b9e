"""``python -m attrax``: the same as the ``attrax`` command."""

from .cli import main

raise SystemExit(main())
