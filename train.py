"""Train a capsule network: ``python train.py model=em_caps data=smallnorb``.

Thin shim around :func:`capsnets.train.main`; the configs live in ``conf/``.
"""

import os

# transparent huge pages for PyTorch's CPU allocator, read when torch loads: capsule layers allocate
# tens-of-MB tensors every step, whose page faults otherwise cost about as much as their arithmetic
# (scripts/bench.py measures it); export THP_MEM_ALLOC_ENABLE=0 to opt out
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from capsnets.train import main  # noqa: E402

if __name__ == "__main__":
    main()
