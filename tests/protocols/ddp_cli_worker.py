"""Run several ``moca-eval`` commands in one ``torchrun`` launch (argv lists as one JSON argument).

Used by ``test_training.py``: one process-group start-up serves both protocols.
"""

import json
import sys

from moca_eval.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            sys.exit(code)
