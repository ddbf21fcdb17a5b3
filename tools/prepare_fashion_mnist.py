"""Same as the `mokd-fashion-mnist` command (mokd_scale.tools.prepare_fashion_mnist); kept so that `python tools/prepare_fashion_mnist.py` works."""
import sys

from mokd_scale.tools.prepare_fashion_mnist import main

if __name__ == "__main__":
    sys.exit(main())
