"""Same as the `mokd-eval-linear` command (mokd_scale.tools.eval_linear); kept so that `python tools/eval_linear.py` works."""
import sys

from mokd_scale.tools.eval_linear import main

if __name__ == "__main__":
    sys.exit(main())
