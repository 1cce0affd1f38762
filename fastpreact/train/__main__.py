"""`python -m fastpreact.train`: see fastpreact/train/cli.py."""
import sys

from .cli import main

sys.exit(main())
