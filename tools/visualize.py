"""Same as the `mokd-visualize` command (mokd_scale.tools.visualize); kept so that `python tools/visualize.py` works."""
import sys

from mokd_scale.tools.visualize import main

if __name__ == "__main__":
    sys.exit(main())
