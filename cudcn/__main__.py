import sys

from cudcn.cli import main

sys.exit(main())
