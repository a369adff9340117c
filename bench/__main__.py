"""python -m attnspec.bench: the same as `attnspec bench`."""

import sys

from .cli import main

sys.exit(main())
