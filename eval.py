"""Evaluate a checkpoint on the test split: ``python eval.py ckpt_path=.../last.ckpt``.

Thin shim around :func:`capsnets.eval.main`; the configs live in ``conf/``.
"""

from capsnets.eval import main

if __name__ == "__main__":
    main()
