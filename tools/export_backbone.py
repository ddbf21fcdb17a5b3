"""Same as the `mokd-export` command (mokd_scale.tools.export); kept so that `python tools/export_backbone.py` works."""
import sys

from mokd_scale.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
