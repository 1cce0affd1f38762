"""`python -m fastpreact.check`: see fastpreact/check/__init__.py."""
import sys

from . import main

sys.exit(main())
