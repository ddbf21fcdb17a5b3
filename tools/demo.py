"""Same as the `mokd-demo` command (mokd_scale.tools.demo); kept so that `python tools/demo.py` works."""
import sys

from mokd_scale.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
