import sys

from finetune_operator.main import main

sys.exit(main())
