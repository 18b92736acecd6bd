import sys

from dlmoe.cli import main

sys.exit(main())
