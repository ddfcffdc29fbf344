import sys

from vitkernels.demo import main

sys.exit(main())
