"""Same as the `mokd-shards` command (mokd_scale.tools.make_shards); kept so that `python tools/make_shards.py` works."""
import sys

from mokd_scale.tools.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
