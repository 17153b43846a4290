"""``torchrun --nproc-per-node N -m tests.train.distcache DATASET SIZE CHUNK_ROWS``: build the image cache with
the ranks sharing its chunks (as ``train`` does under torchrun), one decoding process per rank."""
import sys

from bakeoff.common import distributed
from bakeoff.train.data.cache import build_cache
from bakeoff.train.data.dataset import load_dataset

if __name__ == "__main__":
    w = distributed.init()
    try:
        build_cache(load_dataset(sys.argv[1]), int(sys.argv[2]), workers=1, progress=False,
                    chunk_rows=int(sys.argv[3]), world=w)
    finally:
        distributed.shutdown()
