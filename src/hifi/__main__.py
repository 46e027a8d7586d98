import sys

from hifi.cli import main

sys.exit(main())
