"""``python -m posthoc_align ...`` is the ``posthoc-align`` command line."""

from .cli import main

raise SystemExit(main())
