"""Same as the `mokd-bench` command (mokd_scale.tools.bench.main); kept so that `python tools/bench.py` works."""
import sys

from mokd_scale.tools.bench.main import main

if __name__ == "__main__":
    sys.exit(main())
