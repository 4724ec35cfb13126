"""``python -m im58d.bench``: the same as ``im58d-bench``."""

from . import main

main()
