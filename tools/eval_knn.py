"""Same as the `mokd-eval-knn` command (mokd_scale.tools.eval_knn); kept so that `python tools/eval_knn.py` works."""
import sys

from mokd_scale.tools.eval_knn import main

if __name__ == "__main__":
    sys.exit(main())
