import sys

from attattr_fast.cli import main

sys.exit(main())
