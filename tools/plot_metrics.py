"""Same as the `mokd-plot` command (mokd_scale.tools.plot_metrics); kept so that `python tools/plot_metrics.py` works."""
import sys

from mokd_scale.tools.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
