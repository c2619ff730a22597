import sys

from timm_coordatt.cli import main

sys.exit(main())
