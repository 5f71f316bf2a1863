"""`python -m arbiter.proxy`: a proxy process, as the master starts it (see process.py)."""
import sys

from .process import main

sys.exit(main())
