"""``python -m zsharp_algos.hf SCRIPT.py [args]``: the ``zsharp-hf`` launcher."""
import sys

from .launch import main

sys.exit(main())
