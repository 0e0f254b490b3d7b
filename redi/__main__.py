import sys

from redi.cli.main import main

sys.exit(main())
