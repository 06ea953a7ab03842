import sys

from moca_eval.cli import main

sys.exit(main())
