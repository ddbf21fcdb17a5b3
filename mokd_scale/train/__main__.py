import sys

from mokd_scale.train.cli import main

sys.exit(main())
