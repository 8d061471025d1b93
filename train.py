"""Train a capsule network: ``python train.py model=em_caps data=smallnorb``.

Thin shim around :func:`capsnets.train.main`; the configs live in ``conf/``.
"""

from capsnets.utils.allocator import use_fast_allocator

# jemalloc that keeps freed pages (when the machine has it) and transparent huge pages, chosen before torch
# loads: capsule layers allocate tens-of-MB tensors every step, whose page faults otherwise cost as much as the
# arithmetic (make bench: 1.3-1.5x training speed); CAPSNETS_ALLOCATOR=system opts out (capsnets/utils/allocator.py)
if __name__ == "__main__":
    use_fast_allocator()

from capsnets.train import main  # noqa: E402

if __name__ == "__main__":
    main()
