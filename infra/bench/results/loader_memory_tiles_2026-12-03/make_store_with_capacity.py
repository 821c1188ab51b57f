import sys, subprocess
from atlasflow.store import schema
schema.X_PLATFORM_CONFIG["tiledb"]["create"]["capacity"] = int(sys.argv[2])
from atlasflow.infra.cli import main
sys.exit(main(["synth", "--layout", "store", "--cells", "50000", "--genes", "20000", "--datasets", "5", "--seed", "0", "--out", sys.argv[1]]))
