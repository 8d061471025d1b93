"""Train a capsule network: ``python train.py model=em_caps data=smallnorb``.

Thin shim around :func:`capsnets.train.main`; the configs live in ``conf/``.
"""

from capsnets.train import main

if __name__ == "__main__":
    main()
