#!/usr/bin/env python
"""Convert an original PyTorch checkpoint into a jvit checkpoint directory (see jvit/convert/cli.py).

python tools/convert_torch.py CHECKPOINT --model NAME --output DIR [--weights-key K] [--trust-checkpoint]
"""

import sys

from jvit.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
