"""python -m lmdecode: see lmdecode.cli."""
import sys

from .cli import main

sys.exit(main())
