"""`python -m training` and `torchrun ... -m training`: the same entry as `rn50 train`."""

import sys

from training.train import main

if __name__ == "__main__":
    sys.exit(main())
